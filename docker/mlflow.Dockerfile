# MLflow tracking server for the entcal stack (docker/compose.yaml, service "mlflow").
# MLflow's own images lack boto3 (S3 artifacts) and psycopg2 (Postgres backend): add both.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1

RUN pip install "mlflow==3.17.2" "boto3>=1.40,<2" "psycopg2-binary>=2.9,<3"

RUN useradd --create-home --uid 10001 mlflow
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000
# compose.yaml passes the real command (backend store, artifact destination).
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
