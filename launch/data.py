"""`jaxalign data`: build a TFDS array_record dataset from your own preference file, and check it.

    jaxalign data prepare FORMAT (PATH | --input PATH) --output DIR [--on-error fail|skip]
                          [--split S] [--columns field=column,...] [--shape native|binarized|ratings]
                          [--min-score-gap G] [--desirable-threshold T]
                          [--tokenizer PATH --max-length N [--max-prompt-length N] [--buckets 64,128,256]
                           [--batch-size B]]

FORMAT is pairwise, ranked, stepwise, unpaired or trajectory (jaxalign/data/formats.py). PATH is a .jsonl or
.parquet file or a Hugging Face `datasets` save_to_disk directory; --split, --columns, --shape, --min-score-gap and
--desirable-threshold are the source options of jaxalign/data/sources.py (other column names, rating tables). A bad
option is one error before anything is written. The dataset is written under DIR (one subdirectory per input
content, options and policy; rebuilding unchanged data is a no-op). With
--tokenizer (a tokenizer.json, or a directory holding it and its tokenizer_config.json) the rows are also
tokenized, so truncation and chat-template problems show up now rather than in the run. Prints one JSON report:
rows kept and skipped per reason (and truncation and bucket statistics with --tokenizer).
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", required=True)
    prepare = sub.add_parser("prepare", help="validate FILE and write it as a TFDS array_record dataset under DIR")
    prepare.add_argument("format", choices=("pairwise", "ranked", "stepwise", "unpaired", "trajectory"))
    prepare.add_argument("path", nargs="?", default=None,
                         help="a .jsonl or .parquet file, or a datasets save_to_disk directory")
    prepare.add_argument("--input", default=None, help="the same as PATH")
    prepare.add_argument("--output", required=True, help="the TFDS data directory")
    prepare.add_argument("--on-error", default="fail", choices=("fail", "skip"),
                         help="a malformed row stops (fail, the default) or is skipped and counted (skip)")
    prepare.add_argument("--split", default="train", help="the split of a DatasetDict directory (default train)")
    prepare.add_argument("--columns", default="",
                         help="field=column,...: read each format field from that column, e.g. prompt=question")
    prepare.add_argument("--shape", default="native", choices=("native", "binarized", "ratings"),
                         help="binarized: prompt, chosen/rejected conversations, score_chosen/score_rejected; "
                              "ratings: one row per (prompt, completion, rating)")
    prepare.add_argument("--min-score-gap", type=float, default=None,
                         help="binarized / ratings to pairwise: drop pairs whose score gap is below this")
    prepare.add_argument("--desirable-threshold", type=float, default=None,
                         help="ratings to unpaired: label = rating >= this")
    prepare.add_argument("--tokenizer", default=None, help="also tokenize with this tokenizer.json (or directory)")
    prepare.add_argument("--max-length", type=int, default=None, help="with --tokenizer: sequence length")
    prepare.add_argument("--max-prompt-length", type=int, default=None)
    prepare.add_argument("--buckets", default="", help="with --tokenizer: length bucket bounds, e.g. 64,128")
    prepare.add_argument("--batch-size", type=int, default=None, help="with --tokenizer: report bucket statistics")


def command(args) -> int:
    """Prepare (and optionally tokenize) one file; print the JSON report. Bad data raises ValueError (one line)."""
    import contextlib
    import sys

    try:
        with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress to stdout; stdout is the JSON report
            report = _prepare(args)
        print(json.dumps(report, indent=1))
        return 0
    except FileNotFoundError as e:  # the CLI reports ValueErrors as one line; a missing file is one too
        raise ValueError(str(e)) from e


def _source(args):
    """(input path, SourceOptions), checked before anything is built; ValueError naming the bad option."""
    from jaxalign.data.sources import SourceOptions

    if (args.path is None) == (args.input is None):
        raise ValueError("give the data as PATH or as --input PATH (one of them)")
    options = SourceOptions(split=args.split, columns=args.columns, shape=args.shape,
                            min_score_gap=args.min_score_gap, desirable_threshold=args.desirable_threshold)
    try:
        options.check(args.format)
    except ValueError as e:  # the messages start with the option's name ("shape=ratings ..."): name the flag
        head, rest = str(e).split(" ", 1)
        name, _, value = head.partition("=")
        raise ValueError(" ".join(["--" + name.replace("_", "-"), *([value] if value else []), rest])) from None
    return args.path if args.input is None else args.input, options


def _prepare(args) -> dict:
    from jaxalign.data import builders

    path, options = _source(args)
    if args.tokenizer is None:
        path, validation = builders.prepare(args.format, path, args.output, args.on_error, options)
        return {"dataset_dir": path, "validation": validation}
    if args.max_length is None:
        raise ValueError("--tokenizer needs --max-length")
    from jaxalign.data.pipeline import prepare_dataset
    from jaxalign.data.tokenize import TokenizeConfig, load_hf_tokenizer

    buckets = tuple(int(b) for b in args.buckets.split(",") if b.strip())
    _, results = prepare_dataset(args.format, path, args.output, load_hf_tokenizer(args.tokenizer),
                                 TokenizeConfig(max_length=args.max_length, max_prompt_length=args.max_prompt_length),
                                 on_error=args.on_error, boundaries=buckets, batch_size=args.batch_size,
                                 source_options=options)
    return results
