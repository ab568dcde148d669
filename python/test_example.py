"""Tests of the example network and its data: `.venv/bin/python -m unittest
discover -s python` (part of make test)."""

import pathlib
import tempfile
import unittest

import export
import fmnist

HERE = pathlib.Path(__file__).parent


class SplitTest(unittest.TestCase):
    def test_the_generator_is_core_rngs(self):
        # The same values core/src/rng.rs's test pins.
        self.assertEqual(fmnist.SplitMix64(0).next_u64(), 0xE220A8397B1DCDAF)
        self.assertEqual(fmnist.SplitMix64(7).permutation(10), [9, 5, 8, 6, 1, 2, 4, 7, 0, 3])

    def test_the_split_is_a_partition_of_the_training_images(self):
        train, val = fmnist.train_validation_indices(60000)
        self.assertEqual((len(train), len(val)), (55000, 5000))
        self.assertEqual(sorted(train + val), list(range(60000)))
        self.assertEqual(fmnist.train_validation_indices(60000), (train, val), "seeded: the same every time")
        with self.assertRaises(ValueError):
            fmnist.train_validation_indices(5000)


class ExampleTest(unittest.TestCase):
    def test_the_example_exports_with_three_side_branches(self):
        text = (HERE / "mobilenet_ee.toml").read_text()
        self.assertIn('weights = "../models/mobilenet-ee-fmnist.pt"', text)
        with tempfile.TemporaryDirectory() as d:
            # Its initial weights: the check is of the partition, not of training.
            desc = pathlib.Path(d) / "exits.toml"
            desc.write_text(text.replace('module = "mobilenet_ee.py:build"', f'module = "{HERE / "mobilenet_ee.py"}:build"').replace('weights = "../models/mobilenet-ee-fmnist.pt"\n', ""))
            card = export.export(export.read_description(desc), pathlib.Path(d) / "m", samples=4)
        self.assertEqual([b["activation_shape"] for b in card["branches"]], [[24, 14, 14], [32, 7, 7], [64, 4, 4]])
        self.assertLessEqual(card["check"]["max_abs_difference"], export.TOLERANCE)

    def test_the_shipped_weights_fit_and_export(self):
        # models/mobilenet-ee-fmnist.pt, written by train_example.py.
        with tempfile.TemporaryDirectory() as d:
            card = export.export(export.read_description(HERE / "mobilenet_ee.toml"), pathlib.Path(d) / "m", samples=4)
        self.assertEqual(len(card["branches"]), 3)
        self.assertLessEqual(card["check"]["max_abs_difference"], export.TOLERANCE)


if __name__ == "__main__":
    unittest.main()
