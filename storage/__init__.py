"""Where things live: settings from the environment, S3, MLflow tracking, local services."""
