"""The kit of the experiments that train on a user's own model and files (`dpo_files`, `oreo_files`).

- `model`: the `model.*` section (a Hugging Face or `jaxalign convert` directory and its tokenizer), detecting the
  directory's format, loading the tokenizer and the parameters with one clear error for each mistake;
- `data`: the checks and the tokenization settings every `data.*` section shares;
- `split`: the seeded held-out split of a file's rows;
- `report`: what results.json says about the rows read, skipped and truncated and the parameters trained;
- `export`: the `export.*` section and writing a trained policy back as a Hugging Face checkpoint (with the
  tokenizer files and special-token ids, staged locally when the work directory is on an object store).

An experiment imports this kit and the library, never another experiment (docs/architecture.md).
"""
from jaxalign.experiments.files_kit.data import check_data_section, tokenize_config  # noqa: F401
from jaxalign.experiments.files_kit.export import (  # noqa: F401
    EXPORT_DTYPES,
    TOKENIZER_FILES,
    ExportSection,
    check_context,
    export_family,
    export_policy,
    upload_directory,
    write_export,
)
from jaxalign.experiments.files_kit.model import (  # noqa: F401
    ModelSection,
    load_model,
    load_tokenizer,
    model_format,
    tokenizer_path,
)
from jaxalign.experiments.files_kit.report import data_and_model_summary  # noqa: F401
from jaxalign.experiments.files_kit.split import split_rows  # noqa: F401
