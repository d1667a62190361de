-- Two databases on one server: Airflow's metadata DB and the pgvector store.
CREATE DATABASE airflow;
CREATE DATABASE reindex;
\connect reindex
CREATE EXTENSION IF NOT EXISTS vector;
