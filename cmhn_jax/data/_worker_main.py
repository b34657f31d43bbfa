"""Entry point of `workers.WorkerPool` subprocesses (`python -m` this module).

Separate from workers.py so that running it does not re-execute a module the
package has already imported.
"""

from cmhn_jax.data import workers

if __name__ == "__main__":
  workers.serve()
