"""Raw transport floor (issue 14's definition): W processes in a TCP ring on loopback; each
sendall()s what a ring all-reduce of MIB MiB moves per peer (2*(W-1)/W * MIB) in 4 MiB slices
to its successor from one thread while recv_into()-ing the same from its predecessor into a
4 MiB buffer. One connection per link, default socket options, no arithmetic."""
import json, os, socket, sys, threading, time
import multiprocessing as mp

def peer(rank, W, ports, nbytes, reps, q):
    lst = socket.socket(); lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", ports[rank])); lst.listen(1)
    time.sleep(0.5)
    out = socket.create_connection(("127.0.0.1", ports[(rank + 1) % W]))
    inc, _ = lst.accept()
    buf = bytearray(4 << 20); view = memoryview(buf); src = bytes(4 << 20)
    times = []
    for _ in range(reps):
        def send():
            left = nbytes
            while left:
                n = min(left, len(src)); out.sendall(memoryview(src)[:n]); left -= n
        t0 = time.perf_counter(); th = threading.Thread(target=send); th.start()
        left = nbytes
        while left:
            n = inc.recv_into(view[: min(left, len(buf))]); left -= n
        th.join(); times.append(time.perf_counter() - t0)
    q.put((rank, times))

if __name__ == "__main__":
    W, mib, reps = int(sys.argv[1]), int(sys.argv[2]), 7
    nbytes = int(2 * (W - 1) / W * (mib << 20))
    base = 41000 + (os.getpid() % 1000) * 10
    ports = [base + i for i in range(W)]
    q = mp.Queue()
    ps = [mp.Process(target=peer, args=(r, W, ports, nbytes, reps, q)) for r in range(W)]
    [p.start() for p in ps]
    res = [q.get(timeout=300) for _ in ps]; [p.join() for p in ps]
    per_iter = [max(t[i] for _, t in res) for i in range(reps)]
    per_iter.sort()
    print(json.dumps({"peers": W, "mib": mib, "bytes_per_peer": nbytes, "median_s": per_iter[reps // 2], "min_s": per_iter[0]}))
