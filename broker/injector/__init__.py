"""The Kubernetes admission webhook (``broker injector``): a pod that opts in gets the
credential agent added to it. Decisions are pure (``mutate``); the server only speaks
AdmissionReview."""
