# weir image: static (musl) weir-agent and weir-controller on Alpine. Alpine
# rather than scratch only because the agent drives nftables through the `nft`
# binary; the rest of the image is what that package pulls in.
#
#   docker build -t weir:dev .
FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p weir-agent -p weir-controller \
 && strip target/release/weir-agent target/release/weir-controller

FROM alpine:3.21
RUN apk add --no-cache nftables
COPY --from=build /src/target/release/weir-agent /src/target/release/weir-controller /
# The agent runs as root with only CAP_NET_ADMIN (see manifests/agent-daemonset.yaml);
# the controller's Deployment sets a non-root user.
ENTRYPOINT ["/weir-agent"]
