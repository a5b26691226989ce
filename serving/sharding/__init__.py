"""Running a batch job resumably, in one process or many (``--processes N``, ``accelerate
launch``): which process takes which items (:mod:`.shards`), the per-process progress logs
that let a rerun resume (:mod:`.progress`), the lock that keeps one run per output
(:mod:`.lock`) and the runner that ties them together for a command (:mod:`.runner`). Used
by ``sim predict`` / ``sim label`` (:mod:`serving.cli`) and by training (``multi_process_cpu``);
nothing here knows what a job computes."""
