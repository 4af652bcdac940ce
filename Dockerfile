# vlgate application image: the web app, the Celery worker and the migrations share it.
FROM python:3.11-slim

# VLGATE_ENVIRONMENT=production: a web or worker started from this image refuses a well-known database
# password (common/deployment.py); set it to development only on a machine nobody else can reach.
# NVIDIA_DRIVER_CAPABILITIES: "utility" makes the NVIDIA runtime mount nvidia-smi, which the worker's
# supervisor (scripts/supervise.py) asks for the GPUs the container sees, one worker process each.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models \
    VLGATE_DATA_DIR=/data \
    VLGATE_ENVIRONMENT=production \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /app

# torch first, pinned, so nothing in requirements.txt pulls another build. On x86_64 Linux the
# PyPI wheel of torch==2.13.0 is the CUDA build (it carries its CUDA libraries): that is intended,
# the workers run on NVIDIA GPUs and the image needs no CUDA base.
RUN pip install torch==2.13.0
# Optional, for the faster torchvision-backed image processors (keep it on torch's release line):
# RUN pip install torchvision==0.28.0

COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY . .
RUN chmod 0755 docker/*.sh \
    && useradd --create-home --uid 10001 --user-group vlgate \
    && mkdir -p /data /models /logs \
    && chown vlgate:vlgate /data /models /logs

# Named volumes mounted on these directories start with this ownership.
USER vlgate
EXPOSE 8501
CMD ["/app/docker/web.sh"]
