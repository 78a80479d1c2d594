# The image the chart runs: a release build on a distroless, non-root base.
#   docker build -t sharedlb/sharedlb:0.1.0 .
#   scripts/image     (this machine: no registry; tags localhost/sharedlb:dev)
# Cloud providers are cargo features; add them to FEATURES as they land (e.g. --build-arg FEATURES=aws).
#
# The base images are build arguments. By default it compiles in the Rust image and runs on distroless;
# scripts/image builds the same file with no registry at all: RUNTIME_IMAGE is a base it makes from this
# machine's own libraries, and BINARY_FROM=prebuilt takes the binary cargo already built from the build
# context (a directory holding only `sharedlb`), so the `build` stage is skipped and its image never pulled.
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
# build: compile here; prebuilt: the build context's `sharedlb`. (buildah 1.28, Debian 12's podman build, does not
# look at this default when it picks the stages to run: there, pass --build-arg BINARY_FROM=build explicitly.)
ARG BINARY_FROM=build

FROM ${BUILDER_IMAGE} AS build
ARG FEATURES=""
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin sharedlb ${FEATURES:+--features "$FEATURES"} \
 && install -D target/release/sharedlb /out/sharedlb

FROM scratch AS prebuilt
COPY sharedlb /out/sharedlb

# (not empty: buildah 1.28 leaves a working container behind for an empty stage)
FROM ${BINARY_FROM} AS binary
WORKDIR /out

FROM ${RUNTIME_IMAGE}
COPY --from=binary /out/sharedlb /sharedlb
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/sharedlb"]
CMD ["run", "--metrics-addr=0.0.0.0:8080"]
