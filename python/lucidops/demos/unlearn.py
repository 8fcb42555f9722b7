"""``lucidops demo unlearn``: bounded parameter-efficient unlearning (methods.md section 5).

A tiny causal transformer (:class:`lucidops.models.tiny_lm.TinyCausalLM`) is pretrained here
on synthetic sequences from a few "rules" (each a random permutation of the symbols; see
:func:`lucidops.models.tiny_lm.rule_sequences`) until it predicts them. Some rules are then
to be forgotten: for each adapter variant, peft LoRA adapters are attached to a copy of the
pretrained model (attention ``qkv``/``proj`` and MLP ``fc1``/``fc2``) and
:func:`lucidops.train.gradient_difference` runs for the same steps with the same learning
rate and the same initial adapters:

* ``lora``: plain LoRA everywhere;
* ``sine``: MLP adapters made bounded with :func:`lucidops.patch.peft_lora` (sine on the
  weight product, Delta W = s / sqrt(K_in) sin(omega B A)); attention adapters left plain;
* ``tanh``: the same with tanh.

Every step records the forget and retain losses, the norms of the effective MLP updates
||Delta W||_F (max and sum over layers), of the adapter factors ||A||, ||B||, of the
attention updates, and the gradient norms of the MLP and attention adapters. The demo prints
a table and writes a 4-panel PNG (forget loss, retain loss, update norm, gradient norm).

The measurements come from the models themselves: :func:`run_experiment` returns the
trained peft models, and :func:`update_norms` recomputes any recorded norm from them.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _optional, _validate
from ..models.tiny_lm import RuleSequences, TinyCausalLM, next_token_accuracy, rule_sequences
from ..patch.peft_lora import is_mlp_name, peft_lora
from ..train.unlearning import gradient_difference, sequence_loss
from ._png import png_path_problem, save_png

DESCRIPTION = ("gradient-difference unlearning on a tiny transformer: plain LoRA vs sine/tanh-bounded MLP adapters "
               "(losses, update and gradient norms; table + PNG)")

VARIANTS: Tuple[str, ...] = ("lora", "sine", "tanh")
TARGETS: Tuple[str, ...] = ("qkv", "proj", "fc1", "fc2")

# Per-step series recorded for every variant (the plot and the table read these).
SERIES: Tuple[str, ...] = ("forget_loss", "retain_loss", "update_norm_max", "update_norm_sum", "a_norm", "b_norm",
                           "attn_update_norm", "grad_norm", "attn_grad_norm", "weight_norm")


@dataclass
class DemoConfig:
    """Everything that defines a run (the CLI fills it; tests build it directly)."""

    steps: int = 400
    lr: float = 3e-3
    seed: int = 0
    variants: Tuple[str, ...] = VARIANTS
    n_rules: int = 6
    n_forget: int = 2
    n_symbols: int = 16
    length: int = 12
    d_model: int = 32
    n_layer: int = 2
    n_head: int = 2
    d_ff: int = 64
    pretrain_steps: int = 300
    pretrain_lr: float = 1e-2
    rank: int = 4
    alpha: float = 4.0
    omega: float = 4.0
    batch_size: int = 16
    optimizer: str = "adamw"

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        """A configuration that runs in seconds (for tests and ``--quick``)."""
        base: Dict[str, Any] = dict(steps=60, pretrain_steps=150)
        base.update(overrides)
        return cls(**base)

    def validate(self) -> "DemoConfig":
        """Raise ValueError naming the first bad field."""
        for name in ("steps", "n_rules", "n_forget", "n_symbols", "length", "d_model", "n_layer", "n_head", "d_ff",
                     "pretrain_steps", "rank", "batch_size"):
            value = getattr(self, name)
            _validate.integer(value, name, minimum=1)
        for name in ("lr", "pretrain_lr", "alpha"):
            value = getattr(self, name)
            _validate.real_number(value, name, "> 0")
        _validate.real_number(self.omega, "omega", "!= 0")
        # torch.manual_seed takes [-2^63, 2^64 - 1] and the models are seeded with seed + 2: a
        # seed past that failed after the pretraining, with a traceback.
        _validate.integer(self.seed, "seed", minimum=-2**63, maximum=2**64 - 3)
        if self.n_forget >= self.n_rules:
            raise ValueError(f"n_forget ({self.n_forget}) must be smaller than n_rules ({self.n_rules}): some rules "
                             "must be retained")
        if not self.variants or any(v not in VARIANTS for v in self.variants) or \
                len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants must be distinct names from {VARIANTS}, got {self.variants!r}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        return self


@dataclass
class VariantResult:
    """One adapter variant after unlearning: the trained peft ``model``, its per-step
    ``history`` (every name in :data:`SERIES`) and ``final`` metrics on the full sets."""

    name: str
    model: nn.Module
    history: Dict[str, List[float]]
    final: Dict[str, float]
    seconds: float

    @property
    def finite(self) -> bool:
        """Whether every recorded value and every adapter parameter is finite."""
        values_ok = all(math.isfinite(v) for series in self.history.values() for v in series)
        params_ok = all(bool(torch.isfinite(p).all()) for n, p in self.model.named_parameters() if "lora_" in n)
        return values_ok and params_ok


@dataclass
class DemoResult:
    """The whole experiment: the data, the pretrained model and its metrics, one
    :class:`VariantResult` per variant (in order)."""

    config: DemoConfig
    data: RuleSequences
    forget_rules: List[int]
    pretrained: nn.Module
    pretrained_metrics: Dict[str, float]
    variants: Dict[str, VariantResult] = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------- measurement


def _lora_linears(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    from peft.tuners.lora import Linear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]


def _lora_weights(layer: nn.Module, adapter: str) -> Tuple[Tensor, Tensor]:
    """The weights A (r, K_in) and B (N_out, r) of a peft LoRA layer's ``adapter``."""
    lora_a = cast(nn.ModuleDict, layer.lora_A)[adapter]
    lora_b = cast(nn.ModuleDict, layer.lora_B)[adapter]
    return cast(nn.Linear, lora_a).weight, cast(nn.Linear, lora_b).weight


def _lora_scaling(layer: nn.Module, adapter: str) -> float:
    """A peft LoRA layer's scaling s of ``adapter`` (``lora_alpha / r``)."""
    return float(cast(Dict[str, float], layer.scaling)[adapter])


def effective_update(layer: nn.Module, adapter: str = "default") -> Tensor:
    """The update Delta W (N_out, K_in) a peft LoRA layer adds to its base weight, in float64:
    s B A for plain LoRA, s / g fn(omega B A) when :func:`lucidops.patch.peft_lora` bounded it
    (placement "weight")."""
    a_weight, b_weight = _lora_weights(layer, adapter)
    a, b = a_weight.detach().double(), b_weight.detach().double()
    s = _lora_scaling(layer, adapter)
    cfg = getattr(layer, "_lucidops_lora", None)
    if cfg is None:
        return s * (b @ a)
    if cfg["placement"] != "weight":
        raise ValueError("placement 'output' has no weight update to measure")
    f = torch.sin if cfg["fn"] == "sin" else torch.tanh
    return s / cfg["gain"] * f(cfg["omega"] * (b @ a))


def update_norms(model: nn.Module) -> Dict[str, Dict[str, float]]:
    """Per LoRA layer (qualified name): ``update`` ||Delta W||_F, ``A`` ||A||_F, ``B`` ||B||_F,
    ``grad`` the norm of the adapter gradients (0 if none), and ``mlp`` (1.0 for MLP layers)."""
    out = {}
    for name, layer in _lora_linears(model):
        a, b = _lora_weights(layer, "default")
        grads = [p.grad.detach().double() for p in (a, b) if p.grad is not None]
        out[name] = {"update": float(torch.linalg.norm(effective_update(layer))),
                     "A": float(torch.linalg.norm(a.detach().double())),
                     "B": float(torch.linalg.norm(b.detach().double())),
                     "grad": math.sqrt(sum(float(g.pow(2).sum()) for g in grads)),
                     "mlp": float(is_mlp_name(name))}
    return out


def update_bound(model: nn.Module) -> float:
    """The largest ||Delta W||_F any bounded (patched) MLP layer of ``model`` can reach:
    max over those layers of s / g sqrt(N_out K_in) (inf if a bounded layer is unpatched)."""
    bounds = []
    for name, layer in _lora_linears(model):
        cfg = getattr(layer, "_lucidops_lora", None)
        if cfg is not None:
            a, b = _lora_weights(layer, "default")
            n_out, k_in = b.shape[0], a.shape[1]
            bounds.append(_lora_scaling(layer, "default") / cfg["gain"] * math.sqrt(n_out * k_in))
    return max(bounds) if bounds else float("inf")


def _summarise(norms: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    mlp = [v for v in norms.values() if v["mlp"]]
    attn = [v for v in norms.values() if not v["mlp"]]
    return {"update_norm_max": max(v["update"] for v in mlp),
            "update_norm_sum": sum(v["update"] for v in mlp),
            "a_norm": math.sqrt(sum(v["A"] ** 2 for v in mlp)),
            "b_norm": math.sqrt(sum(v["B"] ** 2 for v in mlp)),
            # the largest single layer's, as update_norm_max is for the MLP (the table sets them side by side)
            "attn_update_norm": max((v["update"] for v in attn), default=0.0),
            "attn_grad_norm": math.sqrt(sum(v["grad"] ** 2 for v in attn))}


@torch.no_grad()
def evaluate(model: nn.Module, ids: Tensor) -> Dict[str, float]:
    """Mean next-token cross-entropy (every position) and accuracy (positions >= 2, the
    ones a model knowing the rule can predict) of ``model`` on ``ids``."""
    was = model.training
    model.eval()
    try:
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        return {"loss": float(loss), "acc": float(next_token_accuracy(logits, ids))}
    finally:
        model.train(was)


# --------------------------------------------------------------------------- the experiment


def pretrain(data: RuleSequences, cfg: DemoConfig) -> TinyCausalLM:
    """Train a fresh :class:`TinyCausalLM` on every rule (AdamW, cosine-decayed lr)."""
    torch.manual_seed(cfg.seed)
    model = TinyCausalLM(data.vocab_size, max_len=data.length, d_model=cfg.d_model, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, d_ff=cfg.d_ff)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.pretrain_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for _ in range(cfg.pretrain_steps):
        batch = data.ids[torch.randint(0, data.ids.shape[0], (32,), generator=gen)]
        loss = sequence_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def attach_adapters(pretrained: nn.Module, variant: str, cfg: DemoConfig) -> nn.Module:
    """A peft model over a deep copy of ``pretrained`` with LoRA on attention and MLP
    layers; for "sine"/"tanh" the MLP adapters are made bounded (attention stays plain).
    The adapter initialisation depends only on ``cfg.seed``, so every variant starts equal."""
    from peft import LoraConfig, get_peft_model

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    base = copy.deepcopy(pretrained)
    torch.manual_seed(cfg.seed + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # peft annotates lora_alpha as int, but a float works: it only computes the scaling lora_alpha / r
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,  # type: ignore[arg-type]
                            target_modules=list(TARGETS), lora_dropout=0.0)
        model = get_peft_model(base, config)
    if variant == "sine":
        peft_lora(model, "sine", omega=cfg.omega, only_mlp=True)
    elif variant == "tanh":
        peft_lora(model, "bounded", omega=cfg.omega, fn="tanh", placement="weight", gain="sqrt_in", only_mlp=True)
    return model


def unlearn(pretrained: nn.Module, variant: str, forget: Tensor, retain: Tensor, cfg: DemoConfig,
            progress: bool = False) -> VariantResult:
    """Attach the variant's adapters and run gradient difference, recording :data:`SERIES`."""
    model = attach_adapters(pretrained, variant, cfg)
    extra: Dict[str, List[float]] = {k: [] for k in SERIES}

    def record(step: int, values: Dict[str, float]) -> None:
        # Called after the optimizer step, with the step's gradients still in place.
        summary = _summarise(update_norms(model))
        for key in SERIES:
            extra[key].append(values[key] if key in values else summary[key])

    start = time.perf_counter()
    torch.manual_seed(cfg.seed + 2)
    gradient_difference(model, forget, retain, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                        optimizer=cfg.optimizer, progress=progress, callback=record)
    seconds = time.perf_counter() - start
    f, r = evaluate(model, forget), evaluate(model, retain)
    final = {"forget_loss": f["loss"], "forget_acc": f["acc"], "retain_loss": r["loss"], "retain_acc": r["acc"],
             "max_update_norm": _nanmax(extra["update_norm_max"]), "max_grad_norm": _nanmax(extra["grad_norm"]),
             "final_update_norm": extra["update_norm_max"][-1],
             "max_attn_update_norm": _nanmax(extra["attn_update_norm"])}
    return VariantResult(variant, model, extra, final, seconds)


def _nanmax(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else float("nan")


def run_experiment(cfg: DemoConfig, progress: bool = False) -> DemoResult:
    """Generate the data, pretrain, and unlearn with every variant of ``cfg.variants``."""
    cfg.validate()
    start = time.perf_counter()
    data = rule_sequences(cfg.n_rules, cfg.n_symbols, cfg.length, seed=cfg.seed)
    forget_rules = list(range(cfg.n_forget))
    forget, retain = data.select(forget_rules), data.select(range(cfg.n_forget, cfg.n_rules))
    pretrained = pretrain(data, cfg)
    pre_f, pre_r = evaluate(pretrained, forget), evaluate(pretrained, retain)
    result = DemoResult(cfg, data, forget_rules, pretrained,
                        {"forget_loss": pre_f["loss"], "forget_acc": pre_f["acc"], "retain_loss": pre_r["loss"],
                         "retain_acc": pre_r["acc"]})
    for variant in cfg.variants:
        result.variants[variant] = unlearn(pretrained, variant, forget, retain, cfg, progress=progress)
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------- report


def format_table(result: DemoResult) -> str:
    """The summary table (one row for the pretrained model, one per variant)."""
    cols = ("variant", "forget loss", "forget acc", "retain loss", "retain acc", "max |dW| mlp", "final |dW| mlp",
            "max |dW| attn", "max grad mlp", "finite")
    rows = []
    p = result.pretrained_metrics
    rows.append(("pretrained", f"{p['forget_loss']:.3f}", f"{p['forget_acc']:.3f}", f"{p['retain_loss']:.3f}",
                 f"{p['retain_acc']:.3f}", "-", "-", "-", "-", "yes"))
    for v in result.variants.values():
        f = v.final
        rows.append((v.name, f"{f['forget_loss']:.4g}", f"{f['forget_acc']:.3f}", f"{f['retain_loss']:.4g}",
                     f"{f['retain_acc']:.3f}", f"{f['max_update_norm']:.4g}", f"{f['final_update_norm']:.4g}",
                     f"{f['max_attn_update_norm']:.4g}", f"{f['max_grad_norm']:.4g}", "yes" if v.finite else "NO"))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    body = ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "-" * len(line)] + body)


def plot(result: DemoResult, path: str) -> str:
    """Write the 4-panel PNG (forget loss, retain loss, MLP update norm, MLP gradient norm
    against step) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = (("forget_loss", "forget loss (ascent)", True), ("retain_loss", "retain loss (descent)", True),
              ("update_norm_max", "max over MLP layers of ||ΔW||_F", True),
              ("grad_norm", "MLP adapter gradient norm", True))
    colors = {"lora": "tab:red", "sine": "tab:blue", "tanh": "tab:green"}
    for ax, (key, title, log) in zip(axes.flat, panels):
        for v in result.variants.values():
            ys = [y if math.isfinite(y) and (y > 0 or not log) else float("nan") for y in v.history[key]]
            ax.plot(range(1, len(ys) + 1), ys, label=v.name, color=colors.get(v.name), lw=1.2)
        if log:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    # The bounded variants' ceiling: |dW_ij| <= s / g, so ||dW||_F <= s / g sqrt(N_out K_in).
    ceilings = [update_bound(v.model) for v in result.variants.values() if v.name != "lora"]
    if ceilings:
        axes.flat[2].axhline(max(ceilings), color="gray", ls="--", lw=1, label="bound of sine/tanh")
        axes.flat[2].legend(loc="lower right")
    axes.flat[0].legend()
    cfg = result.config
    fig.suptitle(f"gradient-difference unlearning, forget rules {result.forget_rules} of {cfg.n_rules} "
                 f"(lr {cfg.lr:g}, rank {cfg.rank}, omega {cfg.omega:g}, seed {cfg.seed})")
    fig.tight_layout()
    return save_png(fig, path)


# --------------------------------------------------------------------------- CLI


DEFAULT_OUT = "demo_unlearn"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options."""
    d = DemoConfig()
    parser.add_argument("--steps", type=int, default=None, help=f"unlearning steps (default {d.steps}; quick: 60)")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"unlearning learning rate (default {d.lr:g})")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the data, model and adapters")
    parser.add_argument("--omega", type=float, default=d.omega, help=f"frequency of the bound (default {d.omega:g})")
    parser.add_argument("--optimizer", default=d.optimizer, choices=("adamw", "sgd"),
                        help=f"unlearning optimizer (default {d.optimizer})")
    parser.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="a run of seconds (fewer pretraining, unlearning steps)")
    parser.add_argument("--out", default=None,
                        help=f"output directory, made if missing (default ./{DEFAULT_OUT})")
    parser.add_argument("--png", default=None, help="PNG path (default OUT/unlearn.png)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is too small to gain from more)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per variant")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """Build and validate the :class:`DemoConfig` from parsed arguments."""
    variants = tuple(v.strip() for v in str(args.variants).split(",") if v.strip())
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"--variants: unknown variant(s) {bad or variants!r}; choose from {','.join(VARIANTS)}")
    kwargs = dict(lr=args.lr, seed=args.seed, omega=args.omega, rank=args.rank, variants=variants,
                  optimizer=args.optimizer)
    if args.steps is not None:
        kwargs["steps"] = args.steps
    cfg = DemoConfig.quick(**kwargs) if args.quick else DemoConfig(**kwargs)
    try:
        return cfg.validate()
    except ValueError as err:
        raise ValueError(f"--{str(err).split(' ')[0]}: {err}") from None


def run(args: argparse.Namespace) -> int:
    """Run the demo: print the table and write the PNG. Returns 0, or 2 on a bad argument."""
    try:
        cfg = config_from_args(args)
        _validate.integer(args.threads, "--threads", minimum=1)
    except ValueError as err:
        print(f"lucidops demo unlearn: error: {err}", file=sys.stderr)
        return 2
    # As demo gpe: "" is not a path (it wrote ./demo_unlearn/unlearn.png), and --png with --out
    # was resolved silently in favour of --png.
    for flag, value in (("--png", args.png), ("--out", args.out)):
        if value is not None and not str(value).strip():
            print(f"lucidops demo unlearn: error: {flag}: an empty path", file=sys.stderr)
            return 2
    if args.png is not None and args.out is not None:
        print("lucidops demo unlearn: error: --png and --out both name where the PNG goes: give one", file=sys.stderr)
        return 2
    png = args.png or os.path.join(DEFAULT_OUT if args.out is None else args.out, "unlearn.png")
    problems = [_optional.missing(package, purpose)
                for package, purpose in (("peft", "the demo's LoRA setup"), ("matplotlib", "the demo's PNG"))]
    path_problem = png_path_problem(png)
    where = "--png" if args.png else "--out" if args.out is not None else f"the default --out {DEFAULT_OUT!r}"
    problems.append(path_problem and f"{where}: {path_problem}")
    for problem in problems:
        if problem:  # said now, not after the pretraining
            print(f"lucidops demo unlearn: error: {problem}", file=sys.stderr)
            return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = run_experiment(cfg, progress=args.progress)
    finally:
        torch.set_num_threads(threads)
    print(f"tiny transformer: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_rules} rules x {cfg.n_symbols} "
          f"symbols, length {cfg.length}; forget rules {result.forget_rules}, retain the rest")
    print(f"unlearning: gradient difference, {cfg.steps} steps, {cfg.optimizer} lr {cfg.lr:g}, LoRA rank {cfg.rank} on "
          f"{'/'.join(TARGETS)}; sine/tanh bound the MLP adapters (omega {cfg.omega:g}), attention stays plain")
    print(f"(loss floor: the start symbol is unpredictable, ln({cfg.n_symbols})/{cfg.length - 1} = "
          f"{math.log(cfg.n_symbols) / (cfg.length - 1):.3f}; accuracy counts positions >= 2)")
    print(format_table(result), flush=True)
    try:  # the path was checked up front; a disk can still fill up: the table above stays
        plot(result, png)
    except OSError as err:
        print(f"lucidops demo unlearn: error: could not write the PNG {png!r}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {png}  ({result.seconds:.1f} s)")
    return 0
