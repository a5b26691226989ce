"""``python -m app --model PATH``: the Gradio app (see :mod:`app.main`)."""

from .main import main

raise SystemExit(main())
