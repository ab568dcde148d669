# The two commands for users: `make demo` and `make test`. Both run the
# idempotent setup first (Debian dataset, project venv with libtorch and
# nats-server, release build); it only installs what is missing.
.PHONY: setup demo test

setup:
	@scripts/setup.sh

# The main job: replay the shipped handover-and-shift scenario (a network
# change, then an input shift) on the overconfident model under every policy
# (about 35 s here the first time, 2 s once the model's answers are
# recorded); it prints a table and where report.json and the
# plots are.
demo: setup
	./target/release/branchpoint run scenarios/handover-and-shift.toml --model models/bvgg-fmnist.safetensors

# Tests run in release mode: they reuse the release build of libtorch's
# wrapper from setup and run the real model at full speed. Then the model
# exporter's tests (python/), in the project venv.
test: setup
	cargo test --release --workspace
	.venv/bin/python -m unittest discover -s python
