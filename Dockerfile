# saelora server image. Default: CPU, serving the embedded SmolLM2-135M (and the demo SAE/adapter if mounted
# into $SAELORA_CACHE/demo). The install steps are the Makefile's own (`make setup`), so image and checkout agree.
#   docker build -t saelora .                                   # CPU: torch's CPU build (the Makefile's auto)
#   docker build -t saelora:gpu --build-arg DEVICE=cuda --build-arg TORCH_INDEX=pypi .   # GPU: CUDA torch
#   ... --build-arg EXTRAS=serve,vllm-gpu                       # GPU with vLLM's CUDA build (--engine vllm)
#   docker build -t saelora:vllm --build-arg EXTRAS=serve,vllm .  # CPU with the vLLM engine (--engine vllm)
# It serves on 0.0.0.0, so it needs a key: docker run -e SAELORA_API_KEY=... (or compose.yaml; docs/deployment.md).
# Nothing touches a GPU at build time: the model is prepared on the CPU whatever DEVICE says.
FROM python:3.11-slim

ARG DEVICE=cpu
ARG EXTRAS=serve
ARG TORCH_INDEX=auto

ENV PYTHONUNBUFFERED=1 \
    SAELORA_CACHE=/home/saelora/.cache/saelora \
    SAELORA_DEVICE=${DEVICE} \
    HF_HUB_OFFLINE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.* \
    && useradd --create-home --uid 1000 saelora

WORKDIR /app
COPY --chown=saelora:saelora . /app
# make setup also fetches the broad corpus's genres (apt-get download: the package lists are removed after it).
RUN make setup VENV=/opt/saelora EXTRAS="${EXTRAS}" TORCH_INDEX="${TORCH_INDEX}" \
    && rm -rf /var/lib/apt/lists/* \
    && chown -R saelora:saelora /opt/saelora /home/saelora

USER 1000
# The embedded model is dequantised and the embedded corpus packed at build time.
RUN SAELORA_DEVICE=cpu /opt/saelora/bin/saelora prepare

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["/opt/saelora/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
CMD ["/opt/saelora/bin/saelora", "serve", "--host", "0.0.0.0", "--port", "8000"]
