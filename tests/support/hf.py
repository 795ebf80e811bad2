"""transformers >= 5 or a skip of the calling test module: the guard the transformers integration's tests share."""
import pytest


def require_transformers_5():
    """The transformers module; skips the calling module (at import) without it or below version 5."""
    transformers = pytest.importorskip("transformers", reason="HuggingFace transformers is not installed "
                                                              "(pip install 'fastattn[transformers]')")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip(f"fastattn's transformers integration needs transformers >= 5, found {transformers.__version__}",
                    allow_module_level=True)
    return transformers
