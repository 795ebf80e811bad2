"""Fine-tune BertForSequenceClassification with transformers' Trainer on attn_implementation="fastattn".

Runs offline by default: a tiny random BERT, a WordPiece tokenizer built from a small vocabulary,
and a small built-in sentiment task (sentences of varying length, so batches carry padding). Prints the held-out
accuracy. With --model PATH it fine-tunes a real checkpoint on disk (tokenizer loaded from the same folder).

    python examples/bert_finetune.py                       # ~30 s on 2 CPU cores
    python examples/bert_finetune.py --model ./bert-base-uncased --epochs 2
    python examples/bert_finetune.py --attn eager          # compare with transformers' own attention
Needs transformers >= 5 and accelerate (pip install "transformers>=5" accelerate).
"""
import argparse
import random
import tempfile
import time

import torch

import fastattn.integrations.transformers  # noqa: F401  (registers attn_implementation="fastattn")
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, BertTokenizerFast, Trainer, TrainingArguments)

POSITIVE = "good great excellent wonderful loved enjoyed fantastic brilliant superb delightful".split()
NEGATIVE = "bad awful terrible boring hated dull poor dreadful weak disappointing".split()
FILLER = ("the movie film plot acting was really quite a story and this it i with very its ending cast "
          "music script so but overall honestly").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_task(n: int, seed: int):
    """Sentences of 4-30 words: filler plus one to three sentiment words; the label is their sentiment."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 27))]
        for w in rng.choices(POSITIVE if label else NEGATIVE, k=rng.randint(1, 3)):
            words.insert(rng.randrange(len(words) + 1), w)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def tiny_tokenizer() -> BertTokenizerFast:
    """A WordPiece tokenizer over the task's words (transformers 5 takes the vocabulary as a dict)."""
    words = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER))
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)


class Encoded(torch.utils.data.Dataset):
    def __init__(self, tok, texts, labels, max_length=64):
        self.enc = tok(texts, truncation=True, max_length=max_length)
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="folder with a BERT checkpoint and its tokenizer (default: tiny random BERT)")
    ap.add_argument("--attn", default="fastattn", help="attn_implementation: fastattn (default), eager, sdpa")
    ap.add_argument("--train", type=int, default=512, help="training examples")
    ap.add_argument("--test", type=int, default=256, help="held-out examples")
    ap.add_argument("--epochs", type=float, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="default 2e-3 for the tiny model, 3e-5 for --model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            tok = AutoTokenizer.from_pretrained(args.model)
            model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2,
                                                                       attn_implementation=args.attn)
            lr = args.lr or 3e-5
        else:
            tok = tiny_tokenizer()
            config = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=128, num_labels=2,
                                pad_token_id=tok.pad_token_id)
            model = BertForSequenceClassification._from_config(config, attn_implementation=args.attn)
            lr = args.lr or 2e-3
        print(f"model: {args.model or 'tiny random BERT'}, attn_implementation={model.config._attn_implementation}")
        train = Encoded(tok, *make_task(args.train, args.seed))
        test = Encoded(tok, *make_task(args.test, args.seed + 1))
        targs = TrainingArguments(output_dir=tmp, num_train_epochs=args.epochs,
                                  per_device_train_batch_size=args.batch_size,
                                  per_device_eval_batch_size=64, learning_rate=lr, warmup_steps=10,
                                  logging_steps=10, report_to=[], save_strategy="no", seed=args.seed,
                                  use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                                  dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=train, processing_class=tok)
        t0 = time.perf_counter()
        result = trainer.train()
        elapsed = time.perf_counter() - t0
        pred = trainer.predict(test)
    accuracy = float((pred.predictions.argmax(-1) == pred.label_ids).mean())
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    last = f", last logged loss {logged[-1]:.4f}" if logged else ""
    print(f"trained {result.global_step} steps in {elapsed:.1f} s: mean train loss over all steps "
          f"{result.training_loss:.4f}{last}")
    print(f"held-out accuracy: {accuracy:.3f} ({args.test} examples, chance 0.5)")


if __name__ == "__main__":
    main()
