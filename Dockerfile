# kscore image: the binary plus ONNX Runtime's shared library (from the official pip wheel).
# Build: docker build -t kscore:local .

FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip unzip && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY schemas schemas
COPY benches benches
RUN cargo build --release --locked --bin kscore
RUN python3 -m pip download --no-deps --only-binary=:all: --implementation cp --python-version 3.11 \
      --platform manylinux_2_28_x86_64 --dest /tmp/ort onnxruntime==1.31.1 \
 && mkdir -p /opt/onnxruntime/lib \
 && unzip -j /tmp/ort/onnxruntime-*.whl 'onnxruntime/capi/libonnxruntime.so*' -d /opt/onnxruntime/lib

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/onnxruntime /opt/onnxruntime
COPY --from=build /src/target/release/kscore /usr/local/bin/kscore
COPY topologies /etc/kscore/topologies
COPY schemas /etc/kscore/schemas
COPY models /etc/kscore/models
RUN mkdir -p /data && chown 65532 /data
ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so.1.31.1
USER 65532
ENTRYPOINT ["/usr/local/bin/kscore"]
