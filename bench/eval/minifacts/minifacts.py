"""The dataset of the `minisys_facts` lm-eval task: minifacts.jsonl beside this file, read by
datasets' local json builder (nothing is fetched), as one ``test`` split."""
from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).with_name("minifacts.jsonl")


def load(**_):
    """lm-eval's ``custom_dataset`` hook: a DatasetDict {"test": rows of question, choices, answer}."""
    import datasets
    return datasets.load_dataset("json", data_files={"test": str(DATA)})
