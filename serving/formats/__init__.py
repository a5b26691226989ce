"""Input and output formats: COCO JSON (box files, results, evaluation), polygons, pictures."""
