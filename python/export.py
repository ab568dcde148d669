"""Export a PyTorch early-exit network for branchpoint.

For every partition branch k it writes two TorchScript modules,

    NAME.head<k>.pt   input x [N, C, H, W] -> (branch-k logits [N, classes],
                                               activation [N, ...])
    NAME.tail<k>.pt   activation [N, ...]  -> final logits [N, classes]

and a model card NAME.json that names every file with its SHA-256, the
input's shape and normalisation, the activation's shape and bytes at each
partition point, and where the validation and test data come from.

What the exporter needs besides the module is a description of its exits
(a TOML file; python/README.md documents every key): the trunk as module
paths in the order the input passes them, the final exit's steps after the
trunk, and for each side branch the trunk block it attaches after and its
own steps. A step is a module path in the model (`features.3`) or one of
the built-in functions in STEPS (`flatten`, `global-avgpool`, `relu`).

Before writing anything it checks, on seeded sample inputs, that the
model's own forward returns every exit's logits, that head(k)'s branch
logits equal the forward's k-th exit and that tail(k)(head(k)(x).activation)
equals its final exit, within 1e-5, both for the modules as described and
for their TorchScript; otherwise it refuses, saying which exit differs and
by how much. Run it with the project's virtual environment, which holds
torch:

    .venv/bin/python python/export.py DESCRIPTION.toml --out DIR/NAME
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import sys
import tomllib
import warnings
from dataclasses import dataclass

# torch warns when numpy is missing (the venv has none; nothing here needs
# it) and that TorchScript is deprecated in favour of torch.export; tch,
# which runs the exported files in Rust, loads TorchScript.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=DeprecationWarning)

import torch  # noqa: E402
from torch import nn  # noqa: E402

# The card's format; the Rust loader refuses any other.
FORMAT = "branchpoint-torchscript/1"
# Largest difference allowed between a partitioned and the unpartitioned
# forward (absolute, and relative to the reference's magnitude).
TOLERANCE = 1e-5

# Steps that are functions rather than modules of the model (torchvision's
# forwards apply these between `features` and `classifier`).
STEPS = {
    "flatten": lambda: nn.Flatten(1),
    "global-avgpool": lambda: nn.AdaptiveAvgPool2d(1),
    "relu": lambda: nn.ReLU(),
}


class ExportError(Exception):
    """What was wrong with the model or its description, and what to do."""


@dataclass
class Branch:
    after: str
    steps: list[str]


@dataclass
class Description:
    """The exits of a model, read from the description file."""

    source: pathlib.Path
    module: str
    weights: pathlib.Path | None
    input: tuple[int, int, int]
    num_classes: int
    mean: list[float]
    std: list[float]
    trunk: list[str]
    final: list[str]
    branches: list[Branch]
    data: dict | None


def _steps(value, key: str, where: pathlib.Path) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s for s in value):
        raise ExportError(f"{where}: {key}: give a module path or a list of steps, e.g. [\"global-avgpool\", \"flatten\", \"classifier\"]")
    return value


def read_description(path: pathlib.Path) -> Description:
    try:
        text = path.read_text()
    except OSError as e:
        raise ExportError(f"could not read the description {path}: {e.strerror}") from None
    try:
        d = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ExportError(f"{path}: not TOML: {e}") from None

    def need(table: dict, key: str, kind, what: str):
        if key not in table:
            raise ExportError(f"{path}: missing key {key!r}: {what}")
        if not isinstance(table[key], kind):
            raise ExportError(f"{path}: {key} = {table[key]!r}: {what}")
        return table[key]

    module = need(d, "module", str, 'the Python file and function that build the model, e.g. "models/my_net.py:build"')
    inp = need(d, "input", dict, "a table with channels, height and width")
    shape = tuple(need(inp, k, int, "a positive integer") for k in ("channels", "height", "width"))
    if min(shape) <= 0:
        raise ExportError(f"{path}: input: channels, height and width must be positive, got {shape}")
    num_classes = need(d, "num_classes", int, "the number of classes every exit scores")
    norm = d.get("normalization", {"mean": [0.0] * shape[0], "std": [1.0] * shape[0]})
    mean, std = norm.get("mean"), norm.get("std")
    for key, v in (("mean", mean), ("std", std)):
        if not isinstance(v, list) or len(v) != shape[0] or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            raise ExportError(f"{path}: normalization.{key}: give one number per input channel ({shape[0]})")
    if any(s <= 0 for s in std):
        raise ExportError(f"{path}: normalization.std must be positive, got {std}")
    trunk = _steps(need(d, "trunk", list, "the trunk's blocks as module paths, in the order the input passes them"), "trunk", path)
    final = _steps(need(d, "final", (str, list), "the final exit's steps after the trunk"), "final", path)
    raw = need(d, "branches", list, "one [[branches]] table per side branch")
    if not raw:
        raise ExportError(f"{path}: branches: an early-exit model needs at least one side branch")
    branches = []
    for i, b in enumerate(raw):
        if not isinstance(b, dict):
            raise ExportError(f"{path}: branches[{i}]: a table with after and module")
        after = need(b, "after", str, f"branches[{i}].after: the trunk block whose output the branch takes")
        if after not in trunk:
            raise ExportError(f"{path}: branches[{i}].after = {after!r} is not a trunk block; the trunk is {trunk}")
        branches.append(Branch(after, _steps(need(b, "module", (str, list), f"branches[{i}].module: the branch's module path or steps"), f"branches[{i}].module", path)))
    points = [trunk.index(b.after) for b in branches]
    if points != sorted(points) or len(set(points)) != len(points):
        raise ExportError(f"{path}: branches must attach after different trunk blocks, in trunk order (branch 1 nearest the input); they attach after {[b.after for b in branches]}")
    if points[-1] == len(trunk) - 1:
        raise ExportError(f"{path}: branch {len(branches)} attaches after the last trunk block {trunk[-1]!r}: nothing would be left for the cloud")
    weights = d.get("weights")
    base = path.parent
    data = _data(d.get("data"), path)
    return Description(
        source=path,
        module=module,
        weights=(base / weights) if isinstance(weights, str) else None,
        input=shape,
        num_classes=num_classes,
        mean=[float(x) for x in mean],
        std=[float(x) for x in std],
        trunk=trunk,
        final=final,
        branches=branches,
        data=data,
    )


BUILTIN_DATASETS = ("fashion-mnist", "cifar-10", "cifar10")


def _data(value, path: pathlib.Path) -> dict | None:
    """The [data] table as the card records it: validation and test, each a
    built-in dataset's name or a tensor file (made absolute here, relative
    to the card when written), and for a built-in dataset the split of its
    training set (split_seed, validation_size; branchpoint's defaults)."""
    if value is None:
        return None
    usage = f"{path}: data: a table like {{ validation = \"fashion-mnist\", test = \"fashion-mnist\" }} or paths of tensor files (python/README.md)"
    if not isinstance(value, dict):
        raise ExportError(usage)
    unknown = set(value) - {"validation", "test", "split_seed", "validation_size"}
    if unknown:
        raise ExportError(f"{path}: data: unknown key(s) {sorted(unknown)}; the keys are validation, test, split_seed and validation_size")
    out = {}
    for side in ("validation", "test"):
        source = value.get(side)
        if not isinstance(source, str) or not source:
            raise ExportError(usage)
        if source not in BUILTIN_DATASETS:
            file = (path.parent / source).resolve()
            if not file.is_file():
                raise ExportError(f"{path}: data.{side} = {source!r}: no such tensor file ({file}); give a built-in dataset ({', '.join(BUILTIN_DATASETS[:2])}) or a safetensors file written by tensorfile.py")
            source = file
        out[side] = source
    seed, size = value.get("split_seed", 2021), value.get("validation_size", 5000)
    if not isinstance(seed, int) or seed < 0 or not isinstance(size, int) or size < 1:
        raise ExportError(f"{path}: data: split_seed must be a non-negative integer and validation_size a positive one")
    out["split"] = {"seed": seed, "validation": size}
    return out


def _card_data(data: dict | None, card_dir: pathlib.Path) -> dict | None:
    """Tensor files as paths relative to the card's folder (absolute if they
    are on another tree)."""
    if data is None:
        return None
    out = dict(data)
    for side in ("validation", "test"):
        if isinstance(out[side], pathlib.Path):
            try:
                out[side] = os.path.relpath(out[side], card_dir.resolve())
            except ValueError:
                out[side] = str(out[side])
    return out


def build_model(desc: Description) -> nn.Module:
    """Calls the description's `module` ("file.py:function"), then loads
    `weights` (a state dict) if the description names one."""
    file, _, function = desc.module.partition(":")
    if not function:
        raise ExportError(f"{desc.source}: module = {desc.module!r}: give FILE.py:FUNCTION")
    file_path = desc.source.parent / file
    spec = importlib.util.spec_from_file_location("branchpoint_user_model", file_path)
    if spec is None or not file_path.is_file():
        raise ExportError(f"{desc.source}: module: {file_path} does not exist")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    build = getattr(mod, function, None)
    if not callable(build):
        raise ExportError(f"{desc.source}: module: {file_path} has no function {function!r}")
    model = build()
    if not isinstance(model, nn.Module):
        raise ExportError(f"{desc.source}: {desc.module}() returned a {type(model).__name__}, not a torch.nn.Module")
    if desc.weights is not None:
        if not desc.weights.is_file():
            raise ExportError(f"{desc.source}: weights: {desc.weights} does not exist; train the model first (the example: python/train_example.py) or drop the key to export its initial weights")
        try:
            state = torch.load(desc.weights, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as e:
            raise ExportError(f"could not read the weights {desc.weights}: {e}") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ExportError(f"{desc.weights} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _step(model: nn.Module, step: str) -> nn.Module:
    if step in STEPS:
        return STEPS[step]()
    try:
        return model.get_submodule(step)
    except AttributeError:
        names = [n for n, _ in model.named_children()]
        raise ExportError(f"step {step!r} is neither a module of {type(model).__name__} (its top-level modules: {names}) nor one of {sorted(STEPS)}") from None


class Head(nn.Module):
    """Input to (branch logits, activation at the partition point)."""

    def __init__(self, trunk: list[nn.Module], branch: list[nn.Module]):
        super().__init__()
        self.trunk = nn.Sequential(*trunk)
        self.branch = nn.Sequential(*branch)

    def forward(self, x):
        a = self.trunk(x)
        return self.branch(a), a


class Tail(nn.Module):
    """Activation at the partition point to final logits."""

    def __init__(self, rest: list[nn.Module]):
        super().__init__()
        self.rest = nn.Sequential(*rest)

    def forward(self, a):
        return self.rest(a)


def partitions(model: nn.Module, desc: Description) -> list[tuple[Head, Tail]]:
    trunk = [_step(model, s) for s in desc.trunk]
    final = [_step(model, s) for s in desc.final]
    out = []
    for b in desc.branches:
        cut = desc.trunk.index(b.after) + 1
        out.append((Head(trunk[:cut], [_step(model, s) for s in b.steps]).eval(), Tail(trunk[cut:] + final).eval()))
    return out


def sample_inputs(desc: Description, n: int, seed: int) -> torch.Tensor:
    """Normalised inputs like the model sees: uniform pixels in [0, 1],
    normalised with the description's mean and std."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *desc.input), generator=g)
    mean = torch.tensor(desc.mean).view(1, -1, 1, 1)
    std = torch.tensor(desc.std).view(1, -1, 1, 1)
    return (x - mean) / std


def _difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| beyond the tolerance's relative allowance, as a
    multiple of TOLERANCE-sized units: <= 1 means within tolerance."""
    allowed = TOLERANCE * (1.0 + want.abs())
    return float(((got - want).abs() / allowed).max())


def check(model: nn.Module, desc: Description, parts, x: torch.Tensor, what: str) -> float:
    """Raises ExportError unless every head and tail reproduces the model's
    forward on x; returns the largest absolute difference seen."""
    with torch.no_grad():
        exits = model(x)
        if isinstance(exits, torch.Tensor) or not isinstance(exits, (list, tuple)):
            raise ExportError(f"the model's forward returned a {type(exits).__name__}; it must return every exit's logits, [branch 1, ..., branch {len(desc.branches)}, final]")
        if len(exits) != len(desc.branches) + 1:
            raise ExportError(f"the model's forward returned {len(exits)} exits; the description has {len(desc.branches)} side branches and the final exit ({len(desc.branches) + 1})")
        for i, e in enumerate(exits):
            if not isinstance(e, torch.Tensor) or tuple(e.shape) != (x.shape[0], desc.num_classes):
                shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
                raise ExportError(f"exit {i + 1} of the model's forward has shape {shape}, expected ({x.shape[0]}, {desc.num_classes})")
        worst = 0.0
        for k, (head, tail) in enumerate(parts, start=1):
            try:
                logits, activation = head(x)
            except RuntimeError as e:
                raise ExportError(f"{what}: head {k} (trunk to {desc.branches[k - 1].after}, then {desc.branches[k - 1].steps}) fails: {e}") from None
            if _difference(logits, exits[k - 1]) > 1:
                raise ExportError(f"{what}: branch {k}'s logits differ from exit {k} of the model's forward by up to {float((logits - exits[k - 1]).abs().max()):.3g} (allowed {TOLERANCE}): the description's branch {k} (after {desc.branches[k - 1].after!r}, steps {desc.branches[k - 1].steps}) is not the model's")
            try:
                final = tail(activation)
            except RuntimeError as e:
                raise ExportError(f"{what}: tail {k} refuses head {k}'s activation of shape {tuple(activation.shape)}: {e}") from None
            if tuple(final.shape) != tuple(exits[-1].shape) or _difference(final, exits[-1]) > 1:
                diff = float((final - exits[-1]).abs().max()) if final.shape == exits[-1].shape else float("inf")
                raise ExportError(f"{what}: tail {k} after head {k} differs from the model's final exit by up to {diff:.3g} (allowed {TOLERANCE}): the trunk or the final steps in the description do not match the model's forward")
            worst = max(worst, float((logits - exits[k - 1]).abs().max()), float((final - exits[-1]).abs().max()))
        return worst


def sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export(desc: Description, out: pathlib.Path, samples: int = 8, seed: int = 0) -> dict:
    """Checks, then writes the TorchScript files and the card; returns the card."""
    torch.manual_seed(seed)
    model = build_model(desc).eval()
    parts = partitions(model, desc)
    x = sample_inputs(desc, samples, seed)
    worst = check(model, desc, parts, x, "as described")
    scripted = []
    with torch.no_grad():
        for head, tail in parts:
            # Traced with one batch size, checked with another: a trace that
            # baked the batch size in is refused here, not in a worker.
            sh = torch.jit.trace(head, x[:2], check_trace=False)
            st = torch.jit.trace(tail, head(x[:2])[1], check_trace=False)
            scripted.append((sh, st))
    worst = max(worst, check(model, desc, scripted, x, "as TorchScript"))

    out.parent.mkdir(parents=True, exist_ok=True)
    name = out.name
    branches = []
    with torch.no_grad():
        for k, ((sh, st), b) in enumerate(zip(scripted, desc.branches), start=1):
            head_file, tail_file = out.parent / f"{name}.head{k}.pt", out.parent / f"{name}.tail{k}.pt"
            sh.save(str(head_file))
            st.save(str(tail_file))
            activation = tuple(sh(x[:1])[1].shape[1:])
            branches.append(
                {
                    "branch": k,
                    "after": b.after,
                    "module": b.steps,
                    "activation_shape": list(activation),
                    "activation_bytes": 4 * math.prod(activation),
                    "head": head_file.name,
                    "head_sha256": sha256(head_file),
                    "tail": tail_file.name,
                    "tail_sha256": sha256(tail_file),
                }
            )
    card = {
        "format": FORMAT,
        "name": name,
        "input": {"channels": desc.input[0], "height": desc.input[1], "width": desc.input[2]},
        "normalization": {"mean": desc.mean, "std": desc.std},
        "num_classes": desc.num_classes,
        "trunk": desc.trunk,
        "final": desc.final,
        "branches": branches,
        "data": _card_data(desc.data, out.parent),
        "exported_with": {"torch": torch.__version__.split("+")[0], "description": desc.source.name},
        "check": {"samples": samples, "seed": seed, "tolerance": TOLERANCE, "max_abs_difference": worst},
    }
    (out.parent / f"{name}.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Export a PyTorch early-exit network as TorchScript heads and tails per partition branch, with its model card.")
    p.add_argument("description", type=pathlib.Path, help="the model's exits, in TOML (python/README.md)")
    p.add_argument("--out", type=pathlib.Path, required=True, help="DIR/NAME: writes DIR/NAME.json, DIR/NAME.head<k>.pt and DIR/NAME.tail<k>.pt")
    p.add_argument("--samples", type=int, default=8, help="sample inputs for the equality checks [default: 8]")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample inputs [default: 0]")
    args = p.parse_args(argv)
    if args.samples < 3:
        print("error: --samples must be at least 3 (traced with 2, checked with all)", file=sys.stderr)
        return 2
    try:
        card = export(read_description(args.description), args.out, args.samples, args.seed)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for b in card["branches"]:
        print(f"branch {b['branch']}: after {b['after']}, activation {b['activation_shape']} ({b['activation_bytes']} bytes), {b['head']} + {b['tail']}")
    print(f"card: {args.out.parent / (args.out.name + '.json')} (largest difference from the model's forward {card['check']['max_abs_difference']:.2g})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
