"""The credential agent (``broker agent``): fetches a pod's credentials with its own
projected token, writes them as files, keeps them fresh and gives them back at exit."""
