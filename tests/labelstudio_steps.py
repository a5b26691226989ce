"""Label Studio client steps of the real-server test, run by the Label Studio venv's Python
(``label-studio-sdk`` conflicts with the project's numpy, so it lives there):

    python labelstudio_steps.py backend ARGS_JSON   # project, uploads, boxes, ML backend,
                                                    # predictions for every task, export
    python labelstudio_steps.py import ARGS_JSON    # import predictions into a new project
    python labelstudio_steps.py accept ARGS_JSON    # add a task's predicted masks to its
                                                    # annotation (for the docs' picture)

Each writes its findings as JSON to ``args["out"]``. Not a test module: the tests in
``test_labelstudio_real.py`` and ``benchmarks/labelstudio_picture.py`` call it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import requests
from label_studio_sdk import LabelStudio


def _client(args: dict) -> tuple[LabelStudio, dict]:
    return (LabelStudio(base_url=args["url"], api_key=args["token"]),
            {"Authorization": f"Token {args['token']}"})


def _rect(box: list, width: int, height: int, rid: str) -> dict:
    x, y, w, h, label = box
    return {"id": rid, "type": "rectanglelabels", "from_name": "box", "to_name": "image",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"x": x / width * 100, "y": y / height * 100, "width": w / width * 100,
                      "height": h / height * 100, "rotation": 0, "rectanglelabels": [label]}}


def _upload(args: dict, auth: dict, pid: int) -> None:
    files = [(f"file{i}", (Path(p).name, Path(p).read_bytes(), "image/png"))
             for i, p in enumerate(args["images"])]
    resp = requests.post(f"{args['url']}/api/projects/{pid}/import", headers=auth, files=files,
                         timeout=60)
    resp.raise_for_status()


def _task(args: dict, auth: dict, task_id: int) -> dict:
    """A task with its annotations and predictions in full."""
    return requests.get(f"{args['url']}/api/tasks/{task_id}", headers=auth, timeout=60).json()


def backend(args: dict) -> dict:
    ls, auth = _client(args)
    project = ls.projects.create(title="sim boxes", label_config=args["config"])
    _upload(args, auth, project.id)
    tasks = list(ls.tasks.list(project=project.id))
    assert len(tasks) == len(args["images"]), [t.data for t in tasks]
    for task in tasks:
        name = next(n for n in args["boxes"] if task.data["image"].endswith("-" + n))
        w, h = args["sizes"][name]
        result = [_rect(b, w, h, f"r{task.id}_{i}") for i, b in enumerate(args["boxes"][name])]
        ls.annotations.create(id=task.id, result=result)
    ml = ls.ml.create(url=args["backend"], project=project.id, is_interactive=True,
                      title="sim")
    start = time.monotonic()
    ls.actions.create(id="retrieve_tasks_predictions", project=project.id,
                      selected_items={"all": True, "excluded": []})
    seconds = time.monotonic() - start
    export = requests.get(f"{args['url']}/api/projects/{project.id}/export",
                          params={"exportType": "JSON"}, headers=auth, timeout=60).json()
    tasks = [_task(args, auth, t["id"]) for t in export]  # the export lists prediction ids
    first = export[0]
    drawn = _rect(args["boxes"][next(n for n in args["boxes"]
                                     if first["data"]["image"].endswith("-" + n))][0],
                  *args["sizes"][next(n for n in args["boxes"]
                                      if first["data"]["image"].endswith("-" + n))], "drawn")
    interactive = requests.post(f"{args['url']}/api/ml/{ml.id}/interactive-annotating",
                                headers=auth, json={"task": first["id"],
                                                    "context": {"result": [drawn]}},
                                timeout=60).json()
    return {"project": project.id, "export": export, "tasks": tasks, "interactive": interactive,
            "predict_seconds": seconds, "first_task": first["id"]}


def import_predictions(args: dict) -> dict:
    ls, auth = _client(args)
    project = ls.projects.create(title="sim predictions", label_config=args["config"])
    tasks = json.loads(Path(args["predictions"]).read_text())
    ls.projects.import_tasks(id=project.id, request=tasks)
    back = requests.get(f"{args['url']}/api/projects/{project.id}/export",
                        params={"exportType": "JSON"}, headers=auth, timeout=60).json()
    return {"project": project.id, "tasks": [_task(args, auth, t["id"]) for t in back]}


def accept(args: dict) -> dict:
    """A reviewer's accept: the task's box annotation gets its prediction's masks added."""
    ls, auth = _client(args)
    task = _task(args, auth, args["task"])
    annotation, prediction = task["annotations"][0], task["predictions"][0]
    ls.annotations.update(id=annotation["id"], result=annotation["result"]
                          + prediction["result"])
    return {"annotation": annotation["id"]}


if __name__ == "__main__":
    step, args = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    found = {"backend": backend, "import": import_predictions, "accept": accept}[step](args)
    Path(args["out"]).write_text(json.dumps(found))
