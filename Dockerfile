# CPU image of ls-autoseg. torch comes from PyTorch's CPU index first: the default index
# would pull a multi-GB CUDA build.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md config.yaml ./
COPY service ./service
COPY models ./models
COPY samples ./samples
RUN pip install -e . && useradd --create-home autoseg && mkdir /state \
    && chown autoseg /app /state
USER autoseg
EXPOSE 9090

# `docker run IMAGE predict --images-dir ... --out-dir ...` runs any other command.
ENTRYPOINT ["ls-autoseg"]
CMD ["serve", "--config", "/app/config.yaml"]
