"""Bridges from atp to other tools' entry points (lmms-eval's model plugin and tasks).

Modules here may import every layer of atp; nothing in atp imports them. Those that need an
optional tool import it themselves (`atp.integrations.lmms_eval` needs the `lmms` extra); the
others (`lmms_spec`, `lmms_table`, `shapes_task`) run without it.
"""
