-- One Postgres, two databases: `mlflow` (MLflow's backend store) and `prefect` (Prefect server).
-- Mounted into /docker-entrypoint-initdb.d by compose.yaml; the postgres image runs it with psql
-- as POSTGRES_USER, once, when the data volume is empty. Both databases belong to that user.
-- \gexec makes it safe to run again by hand: a database that exists is left alone.
SELECT 'CREATE DATABASE mlflow'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'mlflow')\gexec

SELECT 'CREATE DATABASE prefect'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'prefect')\gexec
