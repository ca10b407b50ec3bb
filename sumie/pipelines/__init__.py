"""Generation: one denoise loop behind txt2img, img2img, inpainting, outpainting and hires fix."""
