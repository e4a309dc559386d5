"""The device pixel path: windowing, resizing and JPEG 2000 / JPEG decoding on the GPU.

The CPU path (``tasks.dicom.pixels.preprocess``, run whole in each decode worker) costs ~25 ms
of a core per 2000 px radiograph; a GPU scores tens of thousands of images a second. Here the
workers only read, parse and hand over the native pixel buffer, and the process that owns the
GPU does the per-pixel work in batches, giving the same model input as the CPU path to the bit:

* ``prepare``: the workers' half (read, hash, parse, validate, decode what must be decoded on
  a CPU, hand over stored values or the compressed frame);
* ``arena``: shared-memory blocks the workers write the buffers into, page-locked once so
  that copies to the GPU are asynchronous and need no staging copy;
* ``pipeline``: staging, counting, the display tables, the lookup and the resizes, batch after
  batch with the next batch's copy overlapped (CUDA streams);
* ``tables``: each image's display table from its device-computed histogram with the CPU
  path's own functions (no DICOM rule restated);
* ``resize``: the CPU path's exact box sums (model input and thumbnail from one pass);
* ``processor``: ``DeviceShardProcessor``, the shard loop's processor for this path, and the
  choice of path (``resolve_pixel_path``, ``shard_processor``).

Modules import torch only where they run in the GPU process: ``prepare`` and ``arena`` (which
the decode workers import) do not.
"""
