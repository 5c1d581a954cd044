"""Run a Python script as several processes on this machine, as ``mpiexec -n N`` would, without MPI.

    python -m minivit.launch -n 2 script.py [its arguments]

This process becomes rank 0 and starts ranks 1 .. N-1 (``minivit.distributed.start_processes``); in each of them
``minivit.distributed.world()`` is a LocalGroup of N ranks joined by pipes, so a script written for mpiexec (its
shard of each batch, ``allreduce_gradients``, rank 0 writes) runs unchanged. An error in any rank ends them all
and the exit code is not 0. ``minivit train --processes N`` does the same for the training command.
"""

import argparse
import os
import runpy
import sys
import traceback

from minivit import distributed


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minivit.launch", description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, required=True, help="number of processes (ranks)")
    parser.add_argument("script", help="the Python file every rank runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"-n {args.n}: at least 1 process")
    if args.n > 1:
        distributed.start_processes(args.n, [args.script, *args.args])
    sys.argv = [args.script, *args.args]
    sys.path[0] = os.path.dirname(os.path.abspath(args.script))  # as `python script.py` has it
    code = 0
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as stop:            # sys.exit(n), sys.exit() or sys.exit("message")
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        if code:
            distributed.end_job_on_error(code)
        else:
            distributed.finish_job()
    except distributed.PartnerLost as err:
        print(f"minivit.launch: {err}", file=sys.stderr)
        code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
