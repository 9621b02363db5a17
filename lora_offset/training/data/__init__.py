"""The DreamBooth dataset: instance and class images, captions, aspect-ratio buckets, latent cache.

What a kohya sd-scripts user can expect, and the choices made where kohya leaves room:

* Images: .jpg .jpeg .png .webp .bmp .gif (any case). EXIF orientation is applied. Transparent images
  (RGBA, LA, palette or grey with a transparent colour) are composited on WHITE. 16-bit grey PNGs
  are scaled 0..65535 -> 0..255 (Pillow's own conversion would clip them to white). CMYK is
  converted through its embedded ICC profile when it has one. Animated GIF/WebP: the first frame.
* Skipped, with one warning listing every skipped file and why: empty, truncated or corrupt files,
  files that are not images whatever their name, and images above Pillow's decompression-bomb
  limit (`PIL.Image.MAX_IMAGE_PIXELS`). Images smaller than 64 px on a side are readable but
  skipped with their own warning (upscaling a thumbnail to 512 px teaches the model blur); images
  smaller than the size they train at are trained upscaled, with one warning listing them and
  the ways out (larger images, a lower resolution, `bucket_no_upscale`). Other files in an image
  folder are ignored with one warning (caption files, dot-files and kohya's .npz latent caches silently).
* Captions: `<image stem><caption_extension>`, first non-empty line; read as UTF-8 (a BOM is
  fine), else as Latin-1 with a warning naming the file. No caption file, or an empty one: the
  subset's class_tokens. `shuffle_caption` shuffles the comma-separated tags after the first
  `keep_tokens` tags (kohya semantics).
* Sizes: every image size is a multiple of 64 (SD 1.x's VAE divides by 8 and its UNet halves the
  latent three more times). Without buckets: shorter side resized to `resolution`, then a
  centre crop. With buckets: kohya's bucket list (`bucket_resolutions`), each image in the bucket
  of nearest aspect ratio, resized to cover it (Lanczos), centre-cropped. `bucket_no_upscale`:
  the bucket is the image's own size rounded down to `bucket_reso_steps` (after shrinking it to
  `resolution`² area when larger), so small images are never enlarged. Bucket settings are
  ignored (and not validated) without `enable_bucket`, as in kohya.
* Batches are a pure function of (seed, step): `batch(step)` gives the same images, flips and
  caption shuffles in a new process, so resuming needs only the step number. Each batch holds
  images of one bucket; with regularization subsets it also holds as many class images, loaded
  at the same size, so every step has both halves of the DreamBooth loss.

Everything the user should read goes through `logging.getLogger("lora_offset.data")` (a child of
the "lora_offset" logger); errors the user can fix raise `UserError` with one line.
"""
