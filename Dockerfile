# branchpoint: one image for every service of compose.yaml (the service's
# command picks the subcommand). Build: docker build -t branchpoint .
#
# libtorch comes from the PyPI wheel torch==2.13.0, the only libtorch tch 0.26
# links against (see scripts/setup.sh). The binary carries an rpath to
# /src/.venv/libtorch/lib, so the runtime stage keeps the venv at that path.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The venv first: it changes only with the torch version, so it stays cached.
COPY scripts/setup.sh scripts/setup.sh
RUN python3 -m venv .venv \
 && .venv/bin/pip install --no-cache-dir --disable-pip-version-check torch==2.13.0 \
 && ln -sfn "$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" .venv/libtorch
COPY . .
RUN cargo build --release --bin branchpoint

FROM debian:bookworm-slim
# The dataset (calibrator, planner and fleet read Fashion-MNIST), and curl
# for the API's healthcheck.
RUN apt-get update \
 && apt-get install -y --no-install-recommends dataset-fashion-mnist curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/.venv /src/.venv
COPY --from=build /src/target/release/branchpoint /usr/local/bin/branchpoint
COPY --from=build /src/models /app/models
COPY --from=build /src/scenarios /app/scenarios
COPY --from=build /src/config /app/config
WORKDIR /app
ENTRYPOINT ["branchpoint"]
CMD ["--help"]
