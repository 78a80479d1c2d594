# The image the chart runs: a static-ish release build on a distroless, non-root base.
#   docker build -t sharedlb/sharedlb:0.1.0 .
# Cloud providers are cargo features; add them to FEATURES as they land (e.g. --build-arg FEATURES=aws).
FROM rust:1.95-bookworm AS build
ARG FEATURES=""
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin sharedlb ${FEATURES:+--features "$FEATURES"} \
 && install -D target/release/sharedlb /out/sharedlb

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/sharedlb /sharedlb
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/sharedlb"]
CMD ["run", "--metrics-addr=0.0.0.0:8080"]
