# bpfinit: one image, two entry points.
#   bpfinit-webhook  admission webhook (runs as the non-root user bpfinit, uid 65532)
#   bpfinit-agent    the init container that replaces istio-init (runs with CAP_BPF/NET_ADMIN/PERFMON,
#                    as set by the webhook in the pod it mutates), and the observer/exporter DaemonSet
# Debian-based so that bcc (python3-bpfcc) and kernel headers come from Debian packages.
# Every RUN step is one script under scripts/; scripts/image-build-check.sh lints this file and runs
# the same steps on the CI machine, so the recipe is tested without a container engine.
# Build: docker build -t registry.example/bpfinit:0.1.0 .
ARG DEBIAN_IMAGE=debian:12.11-slim

# ---- build: a venv with bpfinit and its pinned Python dependencies --------------------------------
FROM ${DEBIAN_IMAGE} AS build
ENV BPFINIT_IN_IMAGE_BUILD=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/bpfinit
COPY scripts/ scripts/
RUN scripts/image-install-system.sh build
COPY pyproject.toml README* ./
COPY webhook/ webhook/
COPY initagent/ initagent/
COPY bpf/ bpf/
COPY manifests/ manifests/
RUN scripts/install-python-deps.sh --runtime
RUN scripts/image-prune.sh

# ---- runtime ----------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="bpfinit" \
      org.opencontainers.image.description="eBPF replacement for Istio's iptables istio-init: admission webhook + init agent" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/bpfinit/bpfinit" \
      org.opencontainers.image.base.name="${DEBIAN_IMAGE}"
ENV BPFINIT_IN_IMAGE_BUILD=1
COPY scripts/ /opt/bpfinit/scripts/
RUN /opt/bpfinit/scripts/image-install-system.sh runtime
RUN /opt/bpfinit/scripts/image-add-user.sh
COPY --from=build /opt/bpfinit /opt/bpfinit
ENV PATH=/opt/bpfinit/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 BPFINIT_IN_IMAGE_BUILD=
WORKDIR /tmp
USER 65532:65532
EXPOSE 8443
CMD ["bpfinit-webhook", "serve"]
