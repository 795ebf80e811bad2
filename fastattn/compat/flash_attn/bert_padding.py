"""flash_attn.bert_padding's helpers, from fastattn.padding."""
from fastattn.padding import (IndexFirstAxis, IndexFirstAxisResidual, IndexPutFirstAxis, index_first_axis,
                              index_first_axis_residual, index_put_first_axis, pad_input, unpad_input,
                              unpad_input_for_concatenated_sequences)

__all__ = ["index_first_axis", "index_put_first_axis", "pad_input", "unpad_input",
           "unpad_input_for_concatenated_sequences", "IndexFirstAxis", "IndexPutFirstAxis", "IndexFirstAxisResidual",
           "index_first_axis_residual"]
