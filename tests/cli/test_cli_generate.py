"""graphpeft generate / graphpeft merge (graphpeft/cli/generate.py), on a tiny llama saved with a real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import graphpeft
from graphpeft.cli import commands as cli
from tests.models import perturb_adapters

PROMPTS = ["the cat sat on", "hello world"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *words: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphpeft: error: "), err
    for word in words:
        assert word in lines[0], lines[0]


def _adapter(model_dir: Path, folder: Path, config) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    peft_model = perturb_adapters(graphpeft.rewrite(model, config).eval(), 5, 0.5)
    peft_model.peft_config["default"].base_model_name_or_path = str(model_dir)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    return _adapter(tiny_llama_dir, tmp_path_factory.mktemp("lora"), graphpeft.LoraConfig(target_modules="all-linear"))


def test_generate_prints_what_generate_gives(tiny_llama_dir, lora_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = run(capsys, "generate", lora_dir, *sum((["--prompt", p] for p in PROMPTS), []),
                         "--max-new-tokens", 6, "--json")
    assert code == 0, err
    result = json.loads(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    peft_model = graphpeft.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(lora_dir))
    for prompt, row in zip(PROMPTS, result["outputs"]):
        encoded = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        want = peft_model.generate(**encoded, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert row["prompt"] == prompt and row["tokens"] == want[0, encoded["input_ids"].shape[1]:].tolist()
        assert row["completion"] == tokenizer.decode(row["tokens"], skip_special_tokens=True)

    code, out, _ = run(capsys, "generate", lora_dir, "--prompt", PROMPTS[0], "--max-new-tokens", 6)   # streamed
    assert code == 0 and out.startswith(PROMPTS[0]) and result["outputs"][0]["completion"].strip() in out


def test_generate_reads_prompt_files_and_samples_with_a_seed(lora_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    args = ["generate", lora_dir, "--prompts", prompts, "--max-new-tokens", 4, "--do-sample", "--temperature", 0.8,
            "--top-p", 0.9, "--seed", 3, "--json"]
    first, second = (json.loads(run(capsys, *args)[1]) for _ in range(2))
    assert [r["prompt"] for r in first["outputs"]] == PROMPTS
    assert first["outputs"] == second["outputs"]
    code, out, _ = run(capsys, "generate", lora_dir, "--prompts", prompts, "--max-new-tokens", 4, "--num-beams", 3,
                       "--json")
    assert code == 0 and all(len(r["tokens"]) == 4 for r in json.loads(out)["outputs"])


def test_merge_writes_a_model_folder_that_transformers_loads(tiny_llama_dir, lora_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = run(capsys, "merge", lora_dir, "-o", tmp_path / "merged", "--json")
    assert code == 0, err
    assert json.loads(out)["class"] == "LlamaForCausalLM"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    peft_model = graphpeft.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(lora_dir))
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, return_token_type_ids=False)
    torch.testing.assert_close(merged(**batch).logits, peft_model(**batch).logits, atol=1e-5, rtol=0)
    code, _, err = run(capsys, "merge", lora_dir, "-o", tmp_path / "merged")
    one_line_error(code, err, "merged")                          # exists: refused without --overwrite


def test_bad_input_is_one_line_and_exit_2(tiny_llama_dir, tiny_bert_dir, lora_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = run(capsys, "generate", lora_dir, "--prompts", empty)
    one_line_error(code, err, "no prompts")
    code, _, err = run(capsys, "generate", lora_dir, "--prompt", "word " * 80)
    one_line_error(code, err, "positions")
    code, _, err = run(capsys, "generate", lora_dir)
    one_line_error(code, err, "--prompt")

    bare = tmp_path / "no-tokenizer"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(bare)
    code, _, err = run(capsys, "generate", lora_dir, bare, "--prompt", "hi")
    one_line_error(code, err, "tokenizer")

    cls = graphpeft.rewrite(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir),
                            graphpeft.LoraConfig(task_type="SEQ_CLS"))
    cls.save_pretrained(tmp_path / "cls")
    code, _, err = run(capsys, "generate", tmp_path / "cls", tiny_bert_dir, "--prompt", "hi")
    one_line_error(code, err, "sequence-classification")

    prompt = _adapter(tiny_llama_dir, tmp_path / "prompt", graphpeft.PromptTuningConfig(num_virtual_tokens=2,
                                                                                         task_type="CAUSAL_LM"))
    code, _, err = run(capsys, "merge", prompt, "-o", tmp_path / "out")
    one_line_error(code, err, "cannot be merged")
    assert not (tmp_path / "out").exists()
