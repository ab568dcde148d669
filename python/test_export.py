"""Tests of the exporter: `.venv/bin/python -m unittest discover -s python`.

A small early-exit CNN with random weights goes through the exporter; its
TorchScript heads and tails, loaded back, reproduce the model's own forward.
Descriptions that do not match the model are refused with what differs.
"""

import json
import pathlib
import tempfile
import unittest

import torch

import export

MODEL = '''
import torch
from torch import nn

def block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

class EarlyExit(nn.Module):
    def __init__(self, single=False):
        super().__init__()
        self.single = single
        self.blocks = nn.Sequential(block(1, 8), block(8, 16), block(16, 16))
        self.branches = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Linear(32, 10)),
            nn.Sequential(nn.Flatten(1), nn.Linear(16 * 7 * 7, 10)),
        ])
        self.classifier = nn.Linear(16, 10)

    def forward(self, x):
        a1 = self.blocks[0](x)
        a2 = self.blocks[1](a1)
        a3 = self.blocks[2](a2)
        final = self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(a3, 1), 1))
        if self.single:
            return final
        return [self.branches[0](a1), self.branches[1](a2), final]

def build():
    torch.manual_seed(7)
    m = EarlyExit()
    # Non-trivial batch-norm statistics, as a trained model has.
    for bn in [m.blocks[i][1] for i in range(3)]:
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return m

def build_single():
    m = build()
    m.single = True
    return m
'''

DESCRIPTION = '''
module = "net.py:build"
num_classes = 10
trunk = ["blocks.0", "blocks.1", "blocks.2"]
final = ["global-avgpool", "flatten", "classifier"]

[input]
channels = 1
height = 28
width = 28

[normalization]
mean = [0.286]
std = [0.353]

[[branches]]
after = "blocks.0"
module = "branches.0"

[[branches]]
after = "blocks.1"
module = "branches.1"

[data]
validation = "fashion-mnist"
test = "fashion-mnist"
'''


# A backbone from torchvision's architecture definitions (no pretrained
# weights), for 28x28 grayscale inputs, with side branches attached after
# two of its named blocks.
TORCHVISION_MODEL = """
import torch
from torch import nn
from torchvision.models import mobilenet_v2

BRANCH_AFTER = (3, 6)

class EarlyExitMobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        net = mobilenet_v2(weights=None, num_classes=10, width_mult=0.5)
        stem = net.features[0][0]
        net.features[0][0] = nn.Conv2d(1, stem.out_channels, 3, 2, 1, bias=False)
        self.net = net.eval()
        with torch.no_grad():
            x, channels = torch.zeros(1, 1, 28, 28), []
            for i, block in enumerate(net.features):
                x = block(x)
                if i in BRANCH_AFTER:
                    channels.append(x.shape[1])
        self.branches = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)) for c in channels)

    def forward(self, x):
        exits = []
        for i, block in enumerate(self.net.features):
            x = block(x)
            if i in BRANCH_AFTER:
                exits.append(self.branches[BRANCH_AFTER.index(i)](x))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return exits + [self.net.classifier(x)]

def build():
    return EarlyExitMobileNetV2()
"""

TORCHVISION_DESCRIPTION = """
module = "tv.py:build"
num_classes = 10
trunk = [%s]
final = ["global-avgpool", "flatten", "net.classifier"]

[input]
channels = 1
height = 28
width = 28

[[branches]]
after = "net.features.3"
module = "branches.0"

[[branches]]
after = "net.features.6"
module = "branches.1"
""" % ", ".join(f'"net.features.{i}"' for i in range(19))


def write_tiny(directory) -> dict:
    """Exports the small CNN above (two side branches, random weights from
    a fixed seed) into DIRECTORY as `tiny`: Rust's tests load it from there.
    Returns the card."""
    d = pathlib.Path(directory)
    (d / "net.py").write_text(MODEL)
    (d / "exits.toml").write_text(DESCRIPTION)
    return export.export(export.read_description(d / "exits.toml"), d / "tiny")


class ExportTest(unittest.TestCase):
    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.dir = pathlib.Path(tmp.name)
        (self.dir / "net.py").write_text(MODEL)

    def describe(self, text=DESCRIPTION):
        path = self.dir / "exits.toml"
        path.write_text(text)
        return export.read_description(path)

    def refused(self, text, *needles):
        with self.assertRaises(export.ExportError) as e:
            export.export(self.describe(text), self.dir / "out" / "m")
        for n in needles:
            self.assertIn(n, str(e.exception))
        self.assertFalse((self.dir / "out" / "m.json").exists(), "nothing written when refused")
        return str(e.exception)

    def test_heads_and_tails_reproduce_the_forward_and_the_card_names_every_file(self):
        card = export.export(self.describe(), self.dir / "out" / "m")
        self.assertEqual(card["format"], export.FORMAT)
        self.assertEqual(json.loads((self.dir / "out" / "m.json").read_text()), card)
        self.assertEqual([b["activation_shape"] for b in card["branches"]], [[8, 14, 14], [16, 7, 7]])
        self.assertEqual([b["activation_bytes"] for b in card["branches"]], [4 * 8 * 14 * 14, 4 * 16 * 7 * 7])
        desc = self.describe()
        model = export.build_model(desc).eval()
        x = export.sample_inputs(desc, 5, seed=42)  # not the exporter's samples, another batch size
        with torch.no_grad():
            exits = model(x)
            for b in card["branches"]:
                k = b["branch"]
                for f in ("head", "tail"):
                    self.assertEqual(export.sha256(self.dir / "out" / b[f]), b[f + "_sha256"])
                head = torch.jit.load(str(self.dir / "out" / b["head"]))
                tail = torch.jit.load(str(self.dir / "out" / b["tail"]))
                logits, activation = head(x)
                self.assertEqual(list(activation.shape[1:]), b["activation_shape"])
                self.assertLessEqual(float((logits - exits[k - 1]).abs().max()), 1e-5)
                self.assertLessEqual(float((tail(activation) - exits[-1]).abs().max()), 1e-5)

    def test_a_branch_attached_elsewhere_than_the_model_says_is_refused(self):
        text = DESCRIPTION.replace('after = "blocks.1"\nmodule = "branches.1"', 'after = "blocks.1"\nmodule = ["flatten", "branches.1.1"]')
        # Same steps as branch 2 really has: accepted. Then a real mismatch:
        export.export(self.describe(text), self.dir / "ok" / "m")
        # Branch 2 described as the final classifier on blocks.1's output:
        # the shapes fit, the logits are not the model's branch 2.
        swapped = DESCRIPTION.replace('module = "branches.1"', 'module = ["global-avgpool", "flatten", "classifier"]')
        self.refused(swapped, "branch 2's logits differ", "blocks.1")
        # A head that fails outright says which head and why.
        self.refused(DESCRIPTION.replace('module = "branches.0"', 'module = "branches.1"'), "head 1 (trunk to blocks.0", "fails")

    def test_a_final_exit_that_is_not_the_models_is_refused(self):
        self.refused(DESCRIPTION.replace('final = ["global-avgpool", "flatten", "classifier"]', 'final = ["flatten", "classifier"]'), "tail 1 refuses head 1's activation")
        # A trunk that skips block 3's batch norm: every shape fits, the
        # final logits are not the model's.
        skipping = DESCRIPTION.replace('trunk = ["blocks.0", "blocks.1", "blocks.2"]', 'trunk = ["blocks.0", "blocks.1", "blocks.2.0", "blocks.2.2", "blocks.2.3"]')
        self.refused(skipping, "tail 1 after head 1 differs", "do not match the model's forward")

    def test_a_forward_that_returns_only_the_final_exit_is_refused(self):
        self.refused(DESCRIPTION.replace("net.py:build", "net.py:build_single"), "must return every exit's logits")

    def test_data_is_a_builtin_dataset_or_a_tensor_file_recorded_relative_to_the_card(self):
        import tensorfile

        tensorfile.write(self.dir / "val.safetensors", torch.zeros(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]))
        text = DESCRIPTION.replace('validation = "fashion-mnist"', 'validation = "val.safetensors"')
        card = export.export(self.describe(text), self.dir / "ok" / "m")
        self.assertEqual(card["data"], {"validation": "../val.safetensors", "test": "fashion-mnist", "split": {"seed": 2021, "validation": 5000}})
        seeded = DESCRIPTION.replace('test = "fashion-mnist"', 'test = "fashion-mnist"\nsplit_seed = 7\nvalidation_size = 1000')
        self.assertEqual(export.export(self.describe(seeded), self.dir / "ok2" / "m")["data"]["split"], {"seed": 7, "validation": 1000})
        self.assertIsNone(export.export(self.describe(DESCRIPTION.split("[data]")[0]), self.dir / "ok3" / "m")["data"], "no [data]: none recorded")
        self.refused(DESCRIPTION.replace('validation = "fashion-mnist"', 'validation = "absent.safetensors"'), "data.validation", "no such tensor file")
        self.refused(DESCRIPTION.replace('test = "fashion-mnist"', 'test = "fashion-mnist"\nseed = 3'), "unknown key(s) ['seed']")

    def test_a_torchvision_backbone_with_branches_at_named_blocks_exports(self):
        (self.dir / "tv.py").write_text(TORCHVISION_MODEL)
        card = export.export(self.describe(TORCHVISION_DESCRIPTION), self.dir / "tv" / "m", samples=4)
        self.assertEqual([b["after"] for b in card["branches"]], ["net.features.3", "net.features.6"])
        self.assertEqual([b["activation_shape"][1:] for b in card["branches"]], [[7, 7], [4, 4]])
        self.assertLessEqual(card["check"]["max_abs_difference"], export.TOLERANCE)

    def test_bad_descriptions_name_the_key(self):
        self.refused(DESCRIPTION.replace('after = "blocks.0"', 'after = "blocks.9"'), "branches[0].after", "not a trunk block")
        self.refused(DESCRIPTION.replace('after = "blocks.1"', 'after = "blocks.2"'), "nothing would be left for the cloud")
        self.refused(DESCRIPTION.replace('after = "blocks.1"', 'after = "blocks.0"'), "different trunk blocks")
        self.refused(DESCRIPTION.replace('module = "branches.0"', 'module = "branches.7"'), "branches.7", "neither a module")
        self.refused(DESCRIPTION.replace("num_classes = 10", "num_classes = 7"), "exit 1 of the model's forward has shape (8, 10), expected (8, 7)")
        self.refused(DESCRIPTION.replace("mean = [0.286]", "mean = [0.286, 0.1]"), "normalization.mean", "one number per input channel")
        self.refused(DESCRIPTION.replace("net.py:build", "missing.py:build"), "missing.py does not exist")


if __name__ == "__main__":
    unittest.main()
