"""The Python side of the notebooks in ``lessons/``: ``minivit.lessons.exercises`` holds the checks that give
learners feedback on their derivations. Nothing in the engine imports it."""
