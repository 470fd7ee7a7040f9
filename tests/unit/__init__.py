"""Pure parts, each alone: spec, loss, teachers, exchange, tasks, data, report, tables, loop."""
