"""``python -m app --model PATH``: the Gradio app (see :mod:`app.launch`)."""

from .launch import main

raise SystemExit(main())
