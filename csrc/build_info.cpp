// Reports at run time which parts were compiled in (setup.py defines FASTATTN_WITH_CUDA).
namespace fastattn {
bool cuda_built() {
#ifdef FASTATTN_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace fastattn
