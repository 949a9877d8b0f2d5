"""A process of test_run_index_heal's concurrent adds, in a module of its own: spawned processes import it, and it
imports only the run index (not gradio, not the test module)."""

from studio.run_index import RunIndex


def add_many(root: str, results, count: int = 20) -> None:
    """Queue `count` jobs all asking for the name 'style'; put the names they got on `results`."""
    index = RunIndex(root)
    results.put([index.enqueue("style", lambda name: f"output_dir: runs/{name}\n", free_name=True)
                 for _ in range(count)])
