"""Alembic environment for maild's migrations.

maild runs them itself (`maild db upgrade`, maild/schema.py) on a connection
it opened, passed in `config.attributes["connection"]`. The plain `alembic`
command works too when `sqlalchemy.url` is set in its config.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool

from maild.store.models import metadata
from maild.store.search import include_name

config = context.config


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
        include_name=include_name,  # the search index is not in the models
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = engine_from_config(
        config.get_section(config.config_ini_section) or {},
        prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.begin() as own:
        _run(own)
