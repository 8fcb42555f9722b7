"""``lucidops demo unlearn``, its tiny transformer and synthetic rule data, and the
gradient_difference callback it relies on."""

import argparse
import math
import os

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("matplotlib")

from lucidops.demos import unlearn  # noqa: E402
from lucidops.models.tiny_lm import TinyCausalLM, next_token_accuracy, rule_sequences  # noqa: E402
from lucidops.train.unlearning import gradient_difference, sequence_loss  # noqa: E402

# --------------------------------------------------------------------------- data and model


def test_rule_sequences_follow_their_permutation():
    d = rule_sequences(n_rules=3, n_symbols=5, length=7, seed=3)
    assert d.ids.shape == (15, 7) and d.ids.dtype == torch.int64 and d.vocab_size == 8
    assert d.rules.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    for row, rule in zip(d.ids, d.rules):
        assert row[0] == rule
        sym = row[1:] - d.n_rules
        assert bool(((sym >= 0) & (sym < 5)).all())
        for t in range(len(sym) - 1):  # every step applies the rule's permutation
            assert sym[t + 1] == d.perms[rule, sym[t]]
    for r in range(3):  # each rule is a permutation, and every start symbol appears once
        assert sorted(d.perms[r].tolist()) == list(range(5))
        assert sorted(d.select([r])[:, 1].tolist()) == list(range(3, 8))


def test_rule_sequences_deterministic_by_seed():
    a, b, c = rule_sequences(seed=7), rule_sequences(seed=7), rule_sequences(seed=8)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.perms, b.perms)
    assert not torch.equal(a.perms, c.perms)


def test_rule_sequences_bad_arguments():
    with pytest.raises(ValueError, match="n_rules"):
        rule_sequences(n_rules=0)
    with pytest.raises(ValueError, match="n_symbols"):
        rule_sequences(n_symbols=1)
    with pytest.raises(ValueError, match="length"):
        rule_sequences(length=2)
    with pytest.raises(ValueError, match="rules"):
        rule_sequences(n_rules=2).select([2])
    with pytest.raises(TypeError, match="seed must be an int"):
        rule_sequences(seed=1.7)  # was seed 1, silently
    assert torch.equal(rule_sequences(seed=-1).ids, rule_sequences(seed=-1).ids)  # torch takes negative seeds


def test_tiny_lm_shapes_causality_and_seed():
    torch.manual_seed(0)
    m = TinyCausalLM(vocab_size=11, max_len=9, d_model=16, n_layer=2, n_head=2, d_ff=24)
    torch.manual_seed(0)
    m2 = TinyCausalLM(vocab_size=11, max_len=9, d_model=16, n_layer=2, n_head=2, d_ff=24)
    ids = torch.randint(0, 11, (3, 9), generator=torch.Generator().manual_seed(1))
    out = m(ids)
    assert out.shape == (3, 9, 11) and torch.isfinite(out).all()
    assert torch.equal(out, m2(ids))
    # Causal: changing the last token leaves every earlier position's logits unchanged.
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 11
    out2 = m(ids2)
    torch.testing.assert_close(out2[:, :-1], out[:, :-1], rtol=0, atol=0)
    assert not torch.equal(out2[:, -1], out[:, -1])
    names = [n for n, _ in m.named_modules()]
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2"} <= set(names)
    with pytest.raises(ValueError, match="max_len"):
        m(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="ids"):
        m(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="divisible"):
        TinyCausalLM(10, d_model=10, n_head=3)


def test_next_token_accuracy_counts_from_start():
    ids = torch.tensor([[0, 1, 2, 3]])
    logits = torch.nn.functional.one_hot(torch.tensor([[9, 9, 3, 0]]), 10).float()
    # positions 2, 3 are predicted at 1, 2: position 1 predicts 9 (wrong), 2 predicts 3 (right)
    assert float(next_token_accuracy(logits, ids)) == 0.5
    assert float(next_token_accuracy(logits, ids, start=3)) == 1.0
    for start in (0, 4):  # 0 raised a shape error, 4 (past the last position) returned NaN
        with pytest.raises(ValueError, match=r"start must be an int in \[1, 3\]"):
            next_token_accuracy(logits, ids, start=start)


# --------------------------------------------------------------------------- gradient_difference callback


def test_gradient_difference_callback_sees_every_step():
    cfg = unlearn.DemoConfig.quick(steps=3, pretrain_steps=1, variants=("lora",))
    d = rule_sequences(cfg.n_rules, cfg.n_symbols, cfg.length, seed=0)
    model = unlearn.attach_adapters(unlearn.pretrain(d, cfg), "lora", cfg)
    seen = []

    def cb(step, record):
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        seen.append((step, dict(record), all(g is not None for g in grads)))

    hist = gradient_difference(model, d.select([0]), d.select([1]), steps=3, lr=1e-3, batch_size=4,
                               progress=False, callback=cb)
    assert [s for s, _, _ in seen] == [0, 1, 2] and all(g for _, _, g in seen)
    for i, (_, record, _) in enumerate(seen):
        assert record == {k: v[i] for k, v in hist.items()}
    with pytest.raises(TypeError, match="callback"):
        gradient_difference(model, d.select([0]), d.select([1]), steps=1, lr=1e-3, progress=False, callback=3)


# --------------------------------------------------------------------------- the demo


@pytest.fixture(scope="module")
def quick_result():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return unlearn.run_experiment(unlearn.DemoConfig.quick(steps=30, pretrain_steps=120))
    finally:
        torch.set_num_threads(threads)


def test_quick_experiment_has_every_variant_and_finite_numbers(quick_result):
    r = quick_result
    assert list(r.variants) == list(unlearn.VARIANTS)
    assert r.pretrained_metrics["retain_acc"] > 0.5  # pretraining learned the rules
    for v in r.variants.values():
        for key in unlearn.SERIES:
            assert len(v.history[key]) == 30 and all(math.isfinite(x) for x in v.history[key]), (v.name, key)
        assert v.finite
        for key in ("forget_loss", "retain_loss", "forget_acc", "retain_acc"):
            assert math.isfinite(v.final[key])
        # ascent on the forget set raised its loss above the pretrained model's
        assert v.final["forget_loss"] > r.pretrained_metrics["forget_loss"]
    table = unlearn.format_table(r)
    for name in ("pretrained",) + unlearn.VARIANTS:
        assert any(line.split()[0] == name for line in table.splitlines())


def test_recorded_norms_come_from_the_models(quick_result):
    for v in quick_result.variants.values():
        norms = unlearn.update_norms(v.model)
        mlp = {n: x for n, x in norms.items() if x["mlp"]}
        assert len(mlp) == 4 and len(norms) == 8  # 2 layers x (fc1, fc2) and x (qkv, proj)
        # the last recorded value equals the norm recomputed from the returned model by hand
        by_hand = []
        for name, layer in unlearn._lora_linears(v.model):
            if not mlp.get(name):
                continue
            a = layer.lora_A["default"].weight.detach().double()
            b = layer.lora_B["default"].weight.detach().double()
            s = layer.scaling["default"]
            if v.name == "lora":
                dw = s * b @ a
            else:
                fn = torch.sin if v.name == "sine" else torch.tanh
                dw = s / math.sqrt(a.shape[1]) * fn(quick_result.config.omega * b @ a)
            by_hand.append(float(dw.norm()))
        assert v.history["update_norm_max"][-1] == pytest.approx(max(by_hand), rel=1e-12)
        assert v.history["update_norm_sum"][-1] == pytest.approx(sum(by_hand), rel=1e-12)
        assert v.history["update_norm_max"][-1] > 0


def test_bounded_update_respects_its_bound(quick_result):
    # |s / sqrt(K) fn(.)| <= s / sqrt(K) entrywise, so ||dW||_F <= s sqrt(N_out)
    for name in ("sine", "tanh"):
        v = quick_result.variants[name]
        checked = 0
        for lname, layer in unlearn._lora_linears(v.model):
            if "mlp" in lname:
                dw = unlearn.effective_update(layer)
                bound = layer.scaling["default"] / math.sqrt(dw.shape[1])
                assert float(dw.abs().max()) <= bound * (1 + 1e-12)
                checked += 1
        assert checked > 0, name  # the bounded MLP adapters were found


@pytest.mark.parametrize("name", ["sine", "tanh"])
def test_bounded_variants_really_bound_the_forward(quick_result, name):
    # the patched layer's output equals x (W0 + dW)^T + b with dW from effective_update, so the
    # bound checked on effective_update above is the layer's own
    v = quick_result.variants[name]
    checked = 0
    for lname, layer in unlearn._lora_linears(v.model):
        if "mlp" in lname:
            x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
            base = layer.get_base_layer()
            expect = x.double() @ (base.weight.double() + unlearn.effective_update(layer)).T + base.bias.double()
            torch.testing.assert_close(layer(x).double(), expect, rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked > 0


def test_plot_writes_a_valid_png(quick_result, tmp_path):
    path = unlearn.plot(quick_result, str(tmp_path / "sub" / "u.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 600


def _parse(argv):
    parser = argparse.ArgumentParser()
    unlearn.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_quick_run(tmp_path, capsys):
    from lucidops.cli import main

    png = tmp_path / "q.png"
    rc = main(["demo", "unlearn", "--quick", "--steps", "5", "--variants", "lora,sine", "--png", str(png)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    lines = out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in
            ("pretrained", "lora", "sine", "tanh")}
    assert set(rows) == {"pretrained", "lora", "sine"}
    for name in ("lora", "sine"):
        assert math.isfinite(float(rows[name][1])) and math.isfinite(float(rows[name][3]))
        assert rows[name][-1] == "yes"


def test_cli_keeps_the_table_when_the_png_cannot_be_saved(quick_result, tmp_path, capsys, monkeypatch):
    """A save that failed after the run (the path is checked up front, but a disk can fill up)
    ended in a traceback; now the printed table stays and the exit status is 1."""
    def disk_full(result, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(unlearn, "run_experiment", lambda cfg, progress=False: quick_result)
    monkeypatch.setattr(unlearn, "plot", disk_full)
    rc = unlearn.run(_parse(["--quick", "--png", str(tmp_path / "u.png")]))
    captured = capsys.readouterr()
    assert rc == 1 and "pretrained" in captured.out and "wrote" not in captured.out
    assert "error: could not write the PNG" in captured.err and "No space left on device" in captured.err


def test_png_ending_in_a_separator_is_refused_before_pretraining(tmp_path, capsys, monkeypatch):
    """`--png newdir/` passed the check and crashed with IsADirectoryError after the run."""
    monkeypatch.setattr(unlearn, "run_experiment", lambda *a, **k: pytest.fail("ran before checking --png"))
    rc = unlearn.run(_parse(["--quick", "--png", str(tmp_path / "newdir") + os.sep]))
    err = capsys.readouterr().err
    assert rc == 2 and "--png: must be a file path, got the folder" in err
    assert not (tmp_path / "newdir").exists()


def test_an_unwritable_default_out_is_named_as_the_default(capsys, monkeypatch, tmp_path):
    """Run from a folder nothing can be written in, without --out: the error blamed "--out"
    and named the working folder, not the default ./demo_unlearn it would have made."""
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc (a folder nothing can be written in, even as root)")
    monkeypatch.setattr(unlearn, "run_experiment", lambda *a, **k: pytest.fail("ran before checking --out"))
    monkeypatch.chdir("/proc")
    assert unlearn.run(_parse(["--quick"])) == 2
    assert "error: the default --out 'demo_unlearn': cannot write in '/proc'" in capsys.readouterr().err
    for given in ("/proc/x", "demo_unlearn"):  # given, even as the default's name: the flag ("" is refused)
        assert unlearn.run(_parse(["--quick", "--out", given])) == 2
        assert "error: --out: cannot write in '/proc'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--omega", "0"], "--omega"),
    (["--rank", "0"], "--rank"),
    (["--variants", "lora,foo"], "--variants"),
    (["--variants", ","], "--variants"),
    (["--threads", "0"], "--threads"),
    (["--seed", str(2**64 - 1)], "--seed"),  # failed after the pretraining, with a traceback
    (["--seed", str(-2**63 - 1)], "--seed"),
])
def test_bad_arguments_give_clear_errors(argv, match, capsys, tmp_path):
    rc = unlearn.run(_parse(argv + ["--out", str(tmp_path)]))
    captured = capsys.readouterr()
    out = captured.err  # errors on stderr, like the other commands': `2>/dev/null` hid nothing
    assert rc == 2 and "error" in out and match in out and not captured.out, out
    assert not list(tmp_path.iterdir())  # nothing was run or written


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_forget"):
        unlearn.DemoConfig(n_forget=6, n_rules=6).validate()
    with pytest.raises(ValueError, match="optimizer"):
        unlearn.DemoConfig(optimizer="adam").validate()
    with pytest.raises(ValueError, match="variants"):
        unlearn.DemoConfig(variants=("lora", "lora")).validate()
    with pytest.raises(ValueError, match="variant"):
        unlearn.attach_adapters(torch.nn.Linear(2, 2), "dora", unlearn.DemoConfig())


def test_update_bound(quick_result):
    assert unlearn.update_bound(quick_result.variants["lora"].model) == math.inf
    for name in ("sine", "tanh"):
        v = quick_result.variants[name]
        # fc1 (64 x 32) with s / g = 1 / sqrt(32): sqrt(64 * 32) / sqrt(32) = 8
        assert unlearn.update_bound(v.model) == pytest.approx(8.0)
        assert max(v.history["update_norm_max"]) <= 8.0


def test_attention_and_mlp_update_columns_measure_the_same_thing():
    """Both are the largest single layer's ||dW|| (the attention one was the norm over all the
    attention layers together, about twice a layer's beside the MLP column)."""
    from lucidops.demos.unlearn import _summarise

    norms = {"a.attn": {"mlp": False, "update": 0.3, "grad": 1.0, "A": 1.0, "B": 1.0},
             "b.attn": {"mlp": False, "update": 0.4, "grad": 1.0, "A": 1.0, "B": 1.0},
             "a.mlp": {"mlp": True, "update": 0.2, "grad": 1.0, "A": 1.0, "B": 1.0},
             "b.mlp": {"mlp": True, "update": 0.1, "grad": 1.0, "A": 1.0, "B": 1.0}}
    summary = _summarise(norms)
    assert summary["update_norm_max"] == 0.2 and summary["attn_update_norm"] == 0.4


class _MLPLoraLM(torch.nn.Module):
    """A tiny causal LM with one LoRA-named factor in its MLP (what gradient_difference tracks)."""

    def __init__(self, vocab=11, dim=8, dropout=0.0):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Dropout(dropout))
        self.mlp.lora_A = torch.nn.Parameter(torch.randn(2, dim) * 0.1)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        return self.out(self.mlp(h) + h @ self.mlp.lora_A.T @ self.mlp.lora_A)


def test_gradient_difference_descends_on_retain_and_ascends_on_forget():
    """Each step's gradients are those of CE(retain) - forget_weight CE(forget), computed here
    independently (a flipped sign on the forget term trains the model to remember it)."""
    torch.manual_seed(0)
    model = _MLPLoraLM()
    forget, retain = torch.randint(0, 11, (4, 6)), torch.randint(0, 11, (4, 6))
    model.zero_grad()
    (sequence_loss(model, retain) - 0.5 * sequence_loss(model, forget)).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    seen = {}
    gradient_difference(model, forget, retain, steps=1, lr=1e-3, forget_weight=0.5, batch_size=4, optimizer="sgd",
                        progress=False, mlp_patterns=["mlp"],
                        callback=lambda step, record: seen.update({n: p.grad.clone()
                                                                   for n, p in model.named_parameters()}))
    for name, grad in expected.items():
        torch.testing.assert_close(seen[name], grad, msg=name)


def test_gradient_difference_restores_every_modules_mode():
    """Only the root's flag was restored (model.train(was_training)): a dropout or BatchNorm the
    caller had put in eval mode came back in training mode."""
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (4, 6))
    for root_training in (True, False):
        model = _MLPLoraLM(dropout=0.1).train(root_training)
        model.mlp[1].eval()  # the caller froze a dropout
        before = {name: m.training for name, m in model.named_modules()}
        seen = []
        gradient_difference(model, ids, ids, steps=1, lr=1e-3, progress=False, mlp_patterns=["mlp"],
                            callback=lambda step, record: seen.append(model.mlp[1].training))
        assert seen == [True]  # trained in training mode
        assert {name: m.training for name, m in model.named_modules()} == before


def test_mlp_patterns_must_be_a_sequence_of_regexes():
    # a bare string was one pattern per character: "fc2"'s "c" matched every "blocks" name
    from lucidops.train.unlearning import mlp_lora_parameters

    model = TinyCausalLM(vocab_size=8, d_model=16, n_head=2, n_layer=1, max_len=8)
    with pytest.raises(TypeError, match="mlp_patterns must be a sequence of regex strings"):
        mlp_lora_parameters(model, "fc2")
    with pytest.raises(ValueError, match=r"mlp_patterns: invalid regex '\('"):
        mlp_lora_parameters(model, ["("])
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="mlp_patterns"):
        gradient_difference(model, ids, ids, steps=1, lr=0.1, mlp_patterns="fc2")
