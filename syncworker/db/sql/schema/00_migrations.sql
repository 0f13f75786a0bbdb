-- migrations: the ledger of applied migrations.
--
-- Not made by a migration: migrate() creates it (db/sql/queries/schema.sql,
-- create_migrations_table) before it reads which versions are applied, and
-- records each version it applies here, in the same transaction.
--
-- Placeholders in every file of this folder, as in the migrations:
-- __SCHEMA__ is the quoted schema name, __WAKE__ the quoted literal of the
-- internal wake-up channel, __LOCK_NS__ the liveness locks' namespace.

CREATE TABLE __SCHEMA__.migrations (
    version integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
