# syntax=docker/dockerfile:1
# Build: docker build -t philotes:0.1.0 .

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# sqlx compile-time checks (if any) use the checked-in .sqlx data, never a live database.
ENV SQLX_OFFLINE=true
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin philotes \
 && install -D -m 0755 target/release/philotes /out/philotes

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/philotes /usr/local/bin/philotes
USER 65532:65532
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/philotes"]
CMD ["operator"]
