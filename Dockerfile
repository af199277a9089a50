# The image the KubeRay manifests (kuberay/) run: Ray's own GPU image with this checkout installed.
#   docker build -t <registry>/tmad-ray:latest . && docker push <registry>/tmad-ray:latest
FROM rayproject/ray:2.60.0-py311-gpu
COPY --chown=ray:users . /home/ray/tmad_ray
# torch first, pinned: a plain torch requirement would pull another build on top of the image's
RUN pip install -q "torch==2.13.0" && pip install -q -e /home/ray/tmad_ray "boto3>=1.26"
WORKDIR /home/ray/tmad_ray
