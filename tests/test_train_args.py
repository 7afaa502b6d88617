"""``training_arguments``: the Trainer settings ``sparsebert train`` runs with (here: length-grouped batches)."""

import pytest
from transformers import AutoTokenizer

from sparsebert.integrations import SparseTrainer
from sparsebert.tasks import DataArgs, get_task
from sparsebert.train import TrainConfig, training_arguments


def _padding_ratio(trainer) -> float:
    """Padded tokens over real tokens, summed over one epoch of training batches."""
    padded = real = 0
    for batch in trainer.get_train_dataloader():
        padded += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum())
    return padded / real


@pytest.mark.parametrize("group", [False, True])
def test_group_by_length_cuts_padding_on_real_sst2(group, minilm_path, shared_data, tmp_path, tiny_model):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    task = get_task("sst2")
    data = task.load_data(tok, DataArgs(data_dir=str(shared_data / "glue"), max_train_samples=2048, seed=0))
    cfg = TrainConfig(task="sst2", output_dir=str(tmp_path), batch_size=32, group_by_length=group)
    args = training_arguments(cfg, tmp_path, epochs=1.0)
    trainer = SparseTrainer(recipe=None, teacher=None, model=tiny_model, args=args, train_dataset=data.train,
                            data_collator=task.data_collator(tok), processing_class=tok)
    ratio = _padding_ratio(trainer)
    # SST-2 phrases run from 3 to ~60 tokens: random batches pad to about 3.5x the real tokens
    if group:
        assert ratio < 1.3, ratio
    else:
        assert ratio > 2.5, ratio


@pytest.mark.parametrize("group", [False, True])
def test_eval_keeps_the_dataset_order(group, tmp_path, tiny_model):
    """Eval/predict batches come in dataset order, length-grouped training or not: SQuAD's post-processing
    maps prediction i to window i (transformers 5 length-groups eval batches under group_by_length)."""
    from datasets import Dataset
    from transformers import DataCollatorWithPadding

    from sparsebert.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    lengths = [3 + (7 * i) % 40 for i in range(200)]
    ds = Dataset.from_dict({"input_ids": [[101] + [1000 + i] * (n - 2) + [102] for i, n in enumerate(lengths)],
                            "labels": list(range(200))})
    cfg = TrainConfig(task="sst2", output_dir=str(tmp_path), batch_size=8, group_by_length=group)
    trainer = SparseTrainer(recipe=None, teacher=None, model=tiny_model, args=training_arguments(cfg, tmp_path, epochs=1.0),
                            train_dataset=ds, data_collator=DataCollatorWithPadding(tok), processing_class=tok)
    order = [int(x) for batch in trainer.get_eval_dataloader(ds) for x in batch["labels"]]
    assert order == list(range(200))
