-- Runs once, when the PostgreSQL volume is created: Prefect's own database beside the results
-- database (POSTGRES_DB). Both belong to POSTGRES_USER.
CREATE DATABASE prefect;
