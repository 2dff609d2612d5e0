# The image the KubeRay manifest (`--print-config --kuberay`) runs on every pod: Ray, the CUDA
# build of vLLM and this project, at the versions it is tested with (replica/versions.py).
#   docker build -t deepseek-ray-serve:latest .
#   docker build --build-arg VLLM_VERSION=0.26.0 -t deepseek-ray-serve:vllm-0.26.0 .
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-gpu
ARG RAY_VERSION
# One of the tested releases for Ray 2.60.0: 0.26.0, 0.29.0, 0.32.0.
ARG VLLM_VERSION=0.32.0
WORKDIR /app
COPY --chown=ray:users requirements.txt /app/requirements.txt
RUN pip install --no-cache-dir -r requirements.txt "vllm==${VLLM_VERSION}" "ray[serve]==${RAY_VERSION}"
# The project itself (the manifest's working_dir is local:///app, --image-workdir).
COPY --chown=ray:users . /app
