"""pccl.tools: what runs around the library, never imported by it.

Benchmarks (``bench_allreduce``, ``bench_kernels``, ``bench_state``), churn tests (``chaos``,
``chaos_cmd``, ``hammer``, ``stranger``), the demo and its small LM (``demo``, ``charlm``,
``diloco_charlm``), the WAN delay proxy and network-namespace testbed (``wanproxy``,
``netns``), the status client (``status``), plots (``plots``), the container health check
(``healthcheck``) and the one process toolkit they all share (``proc``: starting the master,
parent-death signals, stopping process trees, reading banners). The core (``pccl``,
``pccl.master``, ``pccl.peer``) imports none of them.
"""
