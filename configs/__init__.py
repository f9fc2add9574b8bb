"""Named presets: typed dataclass configs, one per component, next to the component; presets of them live here and
are selected on the command line with tyro. The demo job's config is ``tools.demo.DemoConfig``."""
